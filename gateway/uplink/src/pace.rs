//! Bandwidth limit: request bodies released at `rate` bytes per second, in slices of about
//! 50 ms of data, so a clinic's WAN is not saturated by uploads. One [`Pacer`] per
//! destination is shared by all of its requests in flight, so concurrency does not
//! multiply the rate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::Instant;

/// A destination's shared send schedule.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    /// When the link is free again (the end of the last slot handed out).
    free_at: Arc<Mutex<Option<Instant>>>,
}

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            free_at: Arc::default(),
        }
    }

    /// Waits for a slot of `bytes` bytes: the slots of all streams follow each other at
    /// `rate`; an idle link earns no credit for a later burst.
    pub async fn wait(&self, bytes: usize) {
        let until = {
            // A poisoned lock only means a panic elsewhere mid-update of one Instant.
            let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = free_at.filter(|t| *t > now).unwrap_or(now);
            let end = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            *free_at = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }

    fn slice(&self) -> usize {
        usize::try_from((self.rate / 20).clamp(1024, 256 * 1024)).unwrap_or(1024)
    }
}

/// The pieces as a stream whose output keeps to the pacer's schedule.
pub fn paced(
    pieces: Vec<Bytes>,
    pacer: Pacer,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let slice = pacer.slice();
    futures_util::stream::unfold(
        (pieces.into_iter(), Bytes::new(), pacer),
        move |(mut pieces, mut current, pacer)| async move {
            while current.is_empty() {
                current = pieces.next()?;
            }
            let out = current.split_to(slice.min(current.len()));
            pacer.wait(out.len()).await;
            Some((Ok(out), (pieces, current, pacer)))
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
        let started = Instant::now();
        let out: Vec<Bytes> = paced(pieces, Pacer::new(100_000))
            .map(Result::unwrap)
            .collect()
            .await;
        let all: Vec<u8> = out.concat();
        assert_eq!(all.len(), 200_000);
        assert!(all[..150_000].iter().all(|&b| b == 1) && all[150_000..].iter().all(|&b| b == 2));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_streams_share_one_rate() {
        let pacer = Pacer::new(100_000);
        let started = Instant::now();
        let a = paced(vec![Bytes::from(vec![1u8; 100_000])], pacer.clone())
            .map(Result::unwrap)
            .collect::<Vec<_>>();
        let b = paced(vec![Bytes::from(vec![2u8; 100_000])], pacer)
            .map(Result::unwrap)
            .collect::<Vec<_>>();
        let (a, b) = tokio::join!(a, b);
        assert_eq!(a.concat().len() + b.concat().len(), 200_000);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2100),
            "two streams of 100 kB at a shared 100 kB/s took {took:?}"
        );
    }
}
