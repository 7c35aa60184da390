//! The control socket: `gatewayd spool status|verify|export` against a running daemon.
//!
//! Protocol: the client writes one JSON [`Request`] line, the daemon answers one JSON
//! [`Response`] line and closes. The socket is `<data_dir>/run/control.sock`, mode 0600.
//! A stale socket left by a killed daemon is removed at start; a client that finds no
//! listener falls back to opening the spool itself.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gateway_spool::{Spool, SpoolError, Status, VerifyReport};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// Largest request line accepted.
const MAX_REQUEST: usize = 16 * 1024;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Verify,
    /// Writes the newest object with this SOP Instance UID to `out` (absolute path).
    Export {
        sop_instance_uid: String,
        out: PathBuf,
    },
    /// Writes the stored HL7 message with this key (`MSH-3|MSH-4|MSH-10`) to `out`.
    ExportMessage {
        key: String,
        out: PathBuf,
    },
    /// Requeues dead letters (of one destination, or all).
    Retry {
        destination: Option<String>,
    },
    /// The safety record of one person (`gatewayd safety show`), by its opaque reference
    /// (`person:{id}` as the audit trail names it); answered by the daemon's
    /// [`ControlExtension`], audited there.
    SafetyShow {
        person: String,
    },
    /// The real study or patient behind a destination's pseudonym (`gatewayd deid
    /// reidentify`): exactly one of `study` (a pseudonymous Study Instance UID) and
    /// `patient` (a pseudonymous Patient ID). Answered by the daemon's extension, audited.
    DeidReidentify {
        destination: String,
        study: Option<String>,
        patient: Option<String>,
    },
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Verify(VerifyReport),
    Exported {
        bytes: u64,
    },
    Requeued {
        objects: u64,
    },
    NotFound,
    Error {
        message: String,
    },
    /// An answer made by a [`ControlExtension`] (JSON as the extension documents it).
    Json {
        value: serde_json::Value,
    },
}

/// Requests the spool cannot answer (e.g. [`Request::SafetyShow`]) go to the services that
/// own the state; the daemon registers them with [`ControlServer::with_extension`].
pub trait ControlExtension: Send + Sync + std::fmt::Debug {
    /// The answer, or `None` when the request is not this extension's.
    fn handle(
        &self,
        request: &Request,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>>;
}

/// Control failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no daemon is listening on {path}")]
    NoDaemon { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: unreadable answer: {source}")]
    Protocol {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where the socket of a data folder lives.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("control.sock")
}

/// Carries out a request on an open spool (used by the daemon and by the CLI fallback).
pub fn execute(spool: &Spool, request: &Request) -> Response {
    let result = match request {
        Request::Status => spool.status().map(Response::Status),
        Request::Verify => spool.verify().map(Response::Verify),
        Request::Export {
            sop_instance_uid,
            out,
        } => export(out, |w| spool.export(sop_instance_uid, w)),
        Request::ExportMessage { key, out } => export(out, |w| spool.export_message(key, w)),
        Request::Retry { destination } => spool
            .retry_failed(destination.as_deref())
            .map(|objects| Response::Requeued { objects }),
        Request::SafetyShow { .. } => Ok(Response::Error {
            message: "the safety store is answered by a running core gateway only".into(),
        }),
        Request::DeidReidentify { .. } => Ok(Response::Error {
            message: "the re-identification map is answered by the running gateway only".into(),
        }),
    };
    match result {
        Ok(r) => r,
        Err(SpoolError::NotFound) => Response::NotFound,
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

fn export(
    out: &Path,
    read: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> Result<gateway_spool::Record, SpoolError>,
) -> Result<Response, SpoolError> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let file = gateway_durable::create_new_private(&tmp)?;
    let mut writer = std::io::BufWriter::new(file);
    let result = read(&mut writer).and_then(|record| {
        writer.flush().map_err(|source| gateway_durable::Error {
            action: "write",
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, out).map_err(|source| gateway_durable::Error {
            action: "rename",
            path: out.to_path_buf(),
            source,
        })?;
        Ok(Response::Exported {
            bytes: record.plain_len,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The daemon side.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    spool: Spool,
    extensions: Vec<std::sync::Arc<dyn ControlExtension>>,
}

impl ControlServer {
    pub fn bind(data_dir: &Path, spool: Spool) -> Result<Self, ControlError> {
        let path = socket_path(data_dir);
        let bind_err = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            gateway_durable::create_private_dir(dir).map_err(|e| bind_err(e.source))?;
        }
        match fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "removed stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Self {
            listener,
            path,
            spool,
            extensions: Vec::new(),
        })
    }

    /// Adds the answerer of requests beyond the spool's.
    pub fn with_extension(mut self, extension: std::sync::Arc<dyn ControlExtension>) -> Self {
        self.extensions.push(extension);
        self
    }

    /// Serves until `shutdown` turns true; removes the socket file on the way out.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let spool = self.spool.clone();
                        let extensions = self.extensions.clone();
                        tokio::spawn(async move { serve_one(stream, spool, extensions).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = fs::remove_file(&self.path);
    }
}

async fn serve_one(
    stream: UnixStream,
    spool: Spool,
    extensions: Vec<std::sync::Arc<dyn ControlExtension>>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take_limited();
    let response = match reader.read_line(&mut line).await {
        Ok(_) if line.len() > MAX_REQUEST => Response::Error {
            message: "request too large".into(),
        },
        Ok(_) => match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(request) => match extensions.iter().find_map(|x| x.handle(&request)) {
                Some(answer) => answer.await,
                None => tokio::task::spawn_blocking(move || execute(&spool, &request))
                    .await
                    .unwrap_or_else(|_| Response::Error {
                        message: "request failed".into(),
                    }),
            },
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        },
        Err(e) => Response::Error {
            message: format!("read failed: {e}"),
        },
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
    let _ = write.shutdown().await;
}

trait TakeLimited: Sized {
    fn take_limited(self) -> tokio::io::Take<Self>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLimited for BufReader<R> {
    fn take_limited(self) -> tokio::io::Take<Self> {
        tokio::io::AsyncReadExt::take(self, MAX_REQUEST as u64 + 1)
    }
}

/// The client side: sends one request to a running daemon.
pub async fn request(data_dir: &Path, request: &Request) -> Result<Response, ControlError> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NoDaemon { path });
        }
        Err(source) => return Err(ControlError::Io { path, source }),
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(|source| ControlError::Protocol {
        path: path.clone(),
        source,
    })?;
    text.push('\n');
    write
        .write_all(text.as_bytes())
        .await
        .map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
    serde_json::from_str(line.trim_end()).map_err(|source| ControlError::Protocol { path, source })
}
