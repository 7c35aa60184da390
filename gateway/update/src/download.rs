//! The resumable bundle download: `GET url` over mutual TLS (the rustls client
//! configuration comes from gateway-tls: the bundle server's CA and the device identity),
//! into `<data_dir>/update/bundle.part`.
//!
//! - **Resumable**: a new attempt (after a cut connection, a restart, a power cut) asks for
//!   `Range: bytes=<length of bundle.part>-`; a `206` whose `Content-Range` starts there is
//!   appended, a `200` starts the file over. Nothing in the partial file is trusted: the
//!   SHA-256 is computed over the whole file at the end.
//! - **Bounded**: never more than the command's `size` bytes (a longer body or
//!   `Content-Length` is refused), an overall deadline, a bounded number of attempts.
//! - **Paced** by gateway-uplink's [`Pacer`] (`update.max_bytes_per_sec`).
//! - **Hash before anything else**: only a file whose SHA-256 equals the command's becomes
//!   `bundle.raucb` (rename + fsync of the folder); a mismatch deletes the file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_uplink::Pacer;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::record::UpdatePaths;

/// Bytes written between two fsyncs of `bundle.part`.
const SYNC_EVERY: u64 = 8 << 20;

/// What to fetch and the bounds.
#[derive(Debug, Clone)]
pub struct DownloadSettings {
    pub url: String,
    pub size: u64,
    pub sha256: [u8; 32],
    /// Overall bound, every attempt included.
    pub deadline: Duration,
    /// Connections tried in all.
    pub max_attempts: u32,
    /// Wait between two attempts.
    pub retry_wait: Duration,
    pub pacer: Option<Pacer>,
}

/// Why a download failed. `Display` names no URL (the vendor knows it) and carries no
/// response body.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the bundle is larger than the command's size of {size} bytes")]
    TooLarge { size: u64 },
    #[error("the bundle server answered HTTP {status}")]
    Status { status: u16 },
    #[error("the bundle server's Content-Range does not continue the partial download")]
    BadRange,
    #[error("transport: {reason}")]
    Transport { reason: String },
    #[error("the connection ended after {have} of {size} bytes")]
    Short { have: u64, size: u64 },
    #[error("the download did not finish within {secs} s")]
    Deadline { secs: u64 },
    #[error("the bundle's SHA-256 is not the command's")]
    HashMismatch,
    #[error("cannot build the HTTP client: {reason}")]
    Client { reason: String },
    #[error(transparent)]
    Io(#[from] gateway_durable::Error),
}

impl DownloadError {
    /// The `failed` code of the update command.
    pub fn code(&self) -> &'static str {
        match self {
            DownloadError::HashMismatch => "hash-mismatch",
            DownloadError::Io(e) if e.source.raw_os_error() == Some(28) => "no-space",
            _ => "download-failed",
        }
    }

    fn retryable(&self) -> bool {
        match self {
            DownloadError::Status { status } => *status >= 500 || *status == 408 || *status == 429,
            DownloadError::Transport { .. }
            | DownloadError::Short { .. }
            | DownloadError::BadRange => true,
            _ => false,
        }
    }
}

/// The HTTP client of the bundle server: `https` only, the given rustls configuration, no
/// proxy, connect timeout 15 s; the overall bound is the download's deadline.
pub fn http_client(tls: Arc<rustls::ClientConfig>) -> Result<reqwest::Client, DownloadError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .https_only(true)
        .no_proxy()
        .tls_backend_preconfigured((*tls).clone())
        .build()
        .map_err(|e| DownloadError::Client {
            reason: describe(e),
        })
}

/// Downloads (or resumes) the bundle and checks its hash; on success `bundle.raucb` holds
/// exactly the command's bytes.
pub async fn download(
    client: &reqwest::Client,
    paths: &UpdatePaths,
    settings: &DownloadSettings,
) -> Result<(), DownloadError> {
    let dir = paths.dir.clone();
    tokio::task::spawn_blocking(move || gateway_durable::ensure_private_dir(&dir))
        .await
        .map_err(join_error)??;
    let deadline = Instant::now() + settings.deadline;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result =
            tokio::time::timeout_at(deadline, fetch(client, &paths.part(), settings)).await;
        match result {
            Ok(Ok(())) => break,
            Err(_) => {
                return Err(DownloadError::Deadline {
                    secs: settings.deadline.as_secs(),
                });
            }
            Ok(Err(e)) if e.retryable() && attempt < settings.max_attempts => {
                warn!(attempt, error = %e, "update download interrupted; resuming");
                if Instant::now() + settings.retry_wait >= deadline {
                    return Err(DownloadError::Deadline {
                        secs: settings.deadline.as_secs(),
                    });
                }
                tokio::time::sleep(settings.retry_wait).await;
            }
            Ok(Err(e)) => return Err(e),
        }
    }
    let part = paths.part();
    let bundle = paths.bundle();
    let dir = paths.dir.clone();
    let expected = settings.sha256;
    tokio::task::spawn_blocking(move || -> Result<(), DownloadError> {
        if sha256_file(&part)? != expected {
            gateway_durable::remove_durably(&part)?;
            return Err(DownloadError::HashMismatch);
        }
        std::fs::rename(&part, &bundle).map_err(|source| gateway_durable::Error {
            action: "rename",
            path: part.clone(),
            source,
        })?;
        gateway_durable::sync_dir(&dir)?;
        Ok(())
    })
    .await
    .map_err(join_error)??;
    info!(
        bytes = settings.size,
        "update bundle downloaded and its SHA-256 verified"
    );
    Ok(())
}

/// SHA-256 of a whole file (blocking).
pub fn sha256_file(path: &Path) -> Result<[u8; 32], gateway_durable::Error> {
    use std::io::Read;
    let ctx = |source| gateway_durable::Error {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(ctx)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(ctx)?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher.finalize().into())
}

/// One connection: from the partial file's length to the end.
async fn fetch(
    client: &reqwest::Client,
    part: &Path,
    settings: &DownloadSettings,
) -> Result<(), DownloadError> {
    let io = |action: &'static str| {
        let path = part.to_path_buf();
        move |source| gateway_durable::Error {
            action,
            path,
            source,
        }
    };
    let mut have = match tokio::fs::metadata(part).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io("stat")(e).into()),
    };
    if have > settings.size {
        have = 0;
    }
    if have == settings.size {
        return Ok(());
    }
    let mut request = client.get(&settings.url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.map_err(transport)?;
    let status = response.status().as_u16();
    let append = match status {
        206 => {
            let range = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match range {
                Some((start, _, total))
                    if start == have && total.is_none_or(|t| t == settings.size) =>
                {
                    true
                }
                Some((_, _, Some(total))) if total != settings.size => {
                    return Err(DownloadError::TooLarge {
                        size: settings.size,
                    });
                }
                _ => {
                    // Start over next time.
                    let _ = tokio::fs::remove_file(part).await;
                    return Err(DownloadError::BadRange);
                }
            }
        }
        200 => false,
        416 => {
            let _ = tokio::fs::remove_file(part).await;
            return Err(DownloadError::BadRange);
        }
        other => return Err(DownloadError::Status { status: other }),
    };
    if !append {
        have = 0;
    }
    if let Some(len) = response.content_length()
        && have.saturating_add(len) > settings.size
    {
        return Err(DownloadError::TooLarge {
            size: settings.size,
        });
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .await
        .map_err(io("open"))?;
    let mut unsynced = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        let len = chunk.len() as u64;
        if have.saturating_add(len) > settings.size {
            return Err(DownloadError::TooLarge {
                size: settings.size,
            });
        }
        if let Some(pacer) = &settings.pacer {
            pacer.wait(chunk.len()).await;
        }
        file.write_all(&chunk).await.map_err(io("write"))?;
        have += len;
        unsynced += len;
        if unsynced >= SYNC_EVERY {
            file.sync_data().await.map_err(io("fsync"))?;
            unsynced = 0;
        }
    }
    file.flush().await.map_err(io("write"))?;
    file.sync_all().await.map_err(io("fsync"))?;
    if have < settings.size {
        return Err(DownloadError::Short {
            have,
            size: settings.size,
        });
    }
    Ok(())
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, end.trim().parse().ok()?, total))
}

fn transport(e: reqwest::Error) -> DownloadError {
    DownloadError::Transport {
        reason: describe(e),
    }
}

fn join_error(e: tokio::task::JoinError) -> DownloadError {
    DownloadError::Transport {
        reason: format!("the file task did not finish: {e}"),
    }
}

/// An error with its causes (TLS alerts say why a handshake failed), without the URL.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(
            parse_content_range("bytes 10-19/20"),
            Some((10, 19, Some(20)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes x-1/2"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn codes_of_download_errors() {
        assert_eq!(DownloadError::HashMismatch.code(), "hash-mismatch");
        assert_eq!(
            DownloadError::Status { status: 404 }.code(),
            "download-failed"
        );
        assert!(!DownloadError::Status { status: 404 }.retryable());
        assert!(DownloadError::Status { status: 503 }.retryable());
    }
}
