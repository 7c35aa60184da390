//! Bandwidth limit: a request body released at `rate` bytes per second, in slices of about
//! 50 ms of data, so a clinic's WAN is not saturated by uploads.

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

/// The pieces as a stream whose cumulative output never runs ahead of `rate`.
pub fn paced(
    pieces: Vec<Bytes>,
    rate: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let rate = rate.max(1);
    let slice = usize::try_from((rate / 20).clamp(1024, 256 * 1024)).unwrap_or(1024);
    let start = tokio::time::Instant::now();
    futures_util::stream::unfold(
        (pieces.into_iter(), Bytes::new(), 0u64),
        move |(mut pieces, mut current, sent)| async move {
            while current.is_empty() {
                current = pieces.next()?;
            }
            let out = current.split_to(slice.min(current.len()));
            let sent = sent + out.len() as u64;
            // This slice may leave once `sent` bytes fit in the time elapsed at `rate`.
            tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate as f64))
                .await;
            Some((Ok(out), (pieces, current, sent)))
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn output_is_complete_and_takes_size_over_rate() {
        let pieces = vec![
            Bytes::from(vec![1u8; 150_000]),
            Bytes::new(),
            Bytes::from(vec![2u8; 50_000]),
        ];
        let started = tokio::time::Instant::now();
        let out: Vec<Bytes> = paced(pieces, 100_000).map(Result::unwrap).collect().await;
        let all: Vec<u8> = out.concat();
        assert_eq!(all.len(), 200_000);
        assert!(all[..150_000].iter().all(|&b| b == 1) && all[150_000..].iter().all(|&b| b == 2));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }
}
