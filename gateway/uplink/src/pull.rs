//! Pulling a study from a DICOMweb archive: the instances of a study listed by QIDO-RS
//! (PS3.18 10.6) and each retrieved by WADO-RS (PS3.18 10.4) as its Part 10 file.
//!
//! A [`PullClient`] is built from a destination's [`UplinkSettings`] with the same HTTP client
//! as the STOW-RS uplink (`http_client`: the box's mutual-TLS identity, timeouts, no proxy),
//! so results come back over the identity the images went up with.
//!
//! - [`PullClient::instances_of_study`]: `GET {url}/studies/{study}/instances` with
//!   `Accept: application/dicom+json`, paged with `limit`/`offset` until a short page (or a
//!   page with nothing new), bounded by [`PullLimits::max_instances`] and, per page, by
//!   [`PullLimits::max_page_bytes`]; the DICOM JSON model is read with serde
//!   ([`parse_instances`]), and every UID must be a valid UID (they become URL path segments
//!   and file names).
//! - [`PullClient::retrieve_instance`]: `GET {url}/studies/{s}/series/{se}/instances/{i}`
//!   with `Accept: multipart/related; type="application/dicom"; transfer-syntax=*` (the
//!   archive's stored bytes, not a transcoding), the body parsed as it streams in
//!   ([`crate::multipart`]) and written to `{dest}.partial`, fsynced, checked (its file meta
//!   names the instance asked for), renamed to `dest` and the folder fsynced. So `dest`
//!   exists only whole and durable: a caller resumes by skipping instances it already has.
//! - [`PullClient::pull_study`]: both, into a folder (`{sop_instance_uid}.dcm`), skipping the
//!   files already there.
//!
//! At most `max_concurrent_requests` retrievals run at once per client (a semaphore, shared
//! by clones), and `max_bytes_per_sec` paces what is read (`pace`). Errors are typed
//! ([`PullError`]) and name no UID, no URL path below the archive root and no content: UIDs
//! identify a patient's study.

use gateway_id::dicom_uid;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::debug;

use crate::multipart::{self, Multipart, MultipartError};
use crate::{UplinkError, UplinkSettings, pace};

/// The `Accept` of a WADO-RS instance retrieval: the archive's stored transfer syntax.
pub const WADO_ACCEPT: &str = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";
/// The `Accept` of a QIDO-RS search.
pub const QIDO_ACCEPT: &str = "application/dicom+json";

/// Bytes of a retrieved file kept in memory to check its file meta group.
const HEAD_BYTES: usize = 64 << 10;

/// One instance of a study, as the archive lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceRef {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
}

/// Bounds of a pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullLimits {
    /// QIDO-RS `limit`: instances asked for per page.
    pub page_size: usize,
    /// Instances of one study at most.
    pub max_instances: usize,
    /// Bytes of one QIDO-RS response at most.
    pub max_page_bytes: u64,
    /// Bounds of a WADO-RS response (its part is the instance's file).
    pub multipart: multipart::Limits,
}

impl Default for PullLimits {
    fn default() -> Self {
        Self {
            page_size: 500,
            max_instances: 100_000,
            max_page_bytes: 32 << 20,
            multipart: multipart::Limits::default(),
        }
    }
}

/// Why the listing of a QIDO-RS response was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QidoError {
    /// Not JSON, or not an array of data sets whose UID attributes hold strings (the parser's
    /// position and kind of error; never the content).
    #[error(
        "QIDO-RS response is not a DICOM JSON array of instances ({kind} error at line {line}, column {column})"
    )]
    Json {
        kind: &'static str,
        line: usize,
        column: usize,
    },
    /// Data set `index` of the response lacks the attribute `tag` (or its value).
    #[error("QIDO-RS result {index} has no {tag} value")]
    MissingTag { index: usize, tag: &'static str },
    /// Data set `index` holds in `tag` something that is not a UID.
    #[error("QIDO-RS result {index}: its {tag} is not a valid UID")]
    BadUid { index: usize, tag: &'static str },
    /// Data set `index` belongs to another study than the one asked for.
    #[error("QIDO-RS result {index} belongs to another study")]
    OtherStudy { index: usize },
}

/// Why a pull failed. `Display` is the cause chain (a TLS alert says why a handshake failed),
/// with the archive's root URL but no UID.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// A UID given by the caller (`what`: study, series or instance) is not a valid UID.
    #[error("the {what} UID asked for is not a valid UID")]
    BadUid { what: &'static str },
    /// Connecting, the TLS handshake, sending the request or waiting for its status failed.
    #[error("{request} {root}: {}", crate::describe(error))]
    Send {
        /// `QIDO-RS` or `WADO-RS`.
        request: &'static str,
        /// The archive's root URL.
        root: String,
        error: reqwest::Error,
    },
    /// The archive answered with a status other than 200 (or 204 to a search).
    #[error("{request} {root}: HTTP {status}")]
    Status {
        request: &'static str,
        root: String,
        status: u16,
    },
    /// The response body could not be read to its end.
    #[error("{request} {root}: reading the response: {}", crate::describe(error))]
    ReadBody {
        request: &'static str,
        root: String,
        error: reqwest::Error,
    },
    /// A QIDO-RS response longer than `limit` bytes.
    #[error("QIDO-RS {root}: response larger than {limit} bytes")]
    ResponseTooLarge { root: String, limit: u64 },
    /// The study lists more than `limit` instances.
    #[error("QIDO-RS {root}: the study has more than {limit} instances")]
    TooManyInstances { root: String, limit: usize },
    /// The QIDO-RS response could not be read as a list of instances.
    #[error("QIDO-RS {root}: {source}")]
    Qido { root: String, source: QidoError },
    /// The WADO-RS response is not one DICOM part in a well-formed multipart/related body.
    #[error("WADO-RS {root}: {source}")]
    Multipart {
        root: String,
        source: MultipartError,
    },
    /// The retrieved file's meta group is unreadable or names another instance.
    #[error("WADO-RS {root}: the retrieved file {reason}")]
    WrongInstance { root: String, reason: &'static str },
    /// Writing, syncing or renaming the file (or its folder) failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The receiver of [`PullClient::retrieve_into`] went away before the end.
    #[error("the receiver of the retrieved instance stopped")]
    SinkClosed,
    /// A retrieval task did not finish (the runtime shuts down).
    #[error("a retrieval task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What [`PullClient::retrieve_into`] sends: the instance's bytes in order, then `Done`.
#[derive(Debug)]
pub enum Piece {
    Bytes(Vec<u8>),
    /// The retrieval ended well and the instance is the one asked for.
    Done,
}

/// Where a download's bytes go: a file (written, then fsynced) or a channel.
enum Sink<'a> {
    File {
        file: &'a mut tokio::fs::File,
        path: &'a Path,
    },
    Channel(&'a mpsc::Sender<Piece>),
}

impl Sink<'_> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        if bytes.is_empty() {
            return Ok(());
        }
        match self {
            Self::File { file, path } => {
                file.write_all(bytes).await.map_err(|source| PullError::Io {
                    op: "write",
                    path: path.to_path_buf(),
                    source,
                })
            }
            Self::Channel(tx) => tx
                .send(Piece::Bytes(bytes.to_vec()))
                .await
                .map_err(|_| PullError::SinkClosed),
        }
    }

    async fn finish(&mut self) -> Result<(), PullError> {
        match self {
            Self::File { file, path } => {
                let io = |op, source| PullError::Io {
                    op,
                    path: path.to_path_buf(),
                    source,
                };
                file.flush().await.map_err(|e| io("write", e))?;
                file.sync_all().await.map_err(|e| io("fsync", e))
            }
            Self::Channel(_) => Ok(()),
        }
    }
}

/// What [`PullClient::pull_study`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PullReport {
    /// Instances the archive lists.
    pub listed: usize,
    /// Retrieved now.
    pub retrieved: usize,
    /// Already in the folder, not retrieved again.
    pub skipped: usize,
    /// Bytes written now.
    pub bytes: u64,
}

/// A client pulling studies from one DICOMweb destination. Clones share the connection pool,
/// the concurrency bound and the pacing.
#[derive(Debug, Clone)]
pub struct PullClient {
    root: String,
    client: reqwest::Client,
    limits: PullLimits,
    permits: Arc<Semaphore>,
    pacer: Option<pace::Pacer>,
}

impl PullClient {
    /// A client for the archive of `settings` (`url` is the DICOMweb root;
    /// `max_concurrent_requests` retrievals at once; `max_bytes_per_sec` paces reading).
    pub fn new(settings: &UplinkSettings, limits: PullLimits) -> Result<Self, UplinkError> {
        Ok(Self {
            root: settings.url.trim_end_matches('/').to_string(),
            client: crate::http_client(settings)?,
            limits,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_requests.max(1))),
            pacer: settings.max_bytes_per_sec.map(pace::Pacer::new),
        })
    }

    /// The instances of the study, in the archive's order, each once.
    pub async fn instances_of_study(&self, study_uid: &str) -> Result<Vec<InstanceRef>, PullError> {
        let study_uid = dicom_uid(study_uid).ok_or(PullError::BadUid { what: "study" })?;
        let page_size = self.limits.page_size.max(1);
        let mut seen = HashSet::new();
        let mut all = Vec::new();
        loop {
            let url = format!(
                "{}/studies/{study_uid}/instances?limit={page_size}&offset={}",
                self.root,
                all.len()
            );
            let Some(body) = self.search(&url).await? else {
                break;
            };
            let page = parse_instances(&body, study_uid).map_err(|source| PullError::Qido {
                root: self.root.clone(),
                source,
            })?;
            let returned = page.len();
            let mut new = 0;
            for r in page {
                if seen.insert(r.sop_instance_uid.clone()) {
                    all.push(r);
                    new += 1;
                }
            }
            if all.len() > self.limits.max_instances {
                return Err(PullError::TooManyInstances {
                    root: self.root.clone(),
                    limit: self.limits.max_instances,
                });
            }
            // A short page is the last; a page with nothing new is an archive that ignores
            // `offset` (it gave everything at once).
            if returned < page_size || new == 0 {
                break;
            }
        }
        debug!(instances = all.len(), "QIDO-RS listed the study");
        Ok(all)
    }

    /// One QIDO-RS page: `None` for 204 No Content.
    async fn search(&self, url: &str) -> Result<Option<Vec<u8>>, PullError> {
        let request = "QIDO-RS";
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, QIDO_ACCEPT)
            .send()
            .await
            .map_err(|error| self.send_error(request, error))?;
        match response.status().as_u16() {
            200 => {}
            204 => return Ok(None),
            status => {
                return Err(PullError::Status {
                    request,
                    root: self.root.clone(),
                    status,
                });
            }
        }
        let limit = self.limits.max_page_bytes;
        let too_large = || PullError::ResponseTooLarge {
            root: self.root.clone(),
            limit,
        };
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.read_error(request, error))?
        {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            self.pace(chunk.len()).await;
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    /// Retrieves the instance into `dest` (whole and fsynced, or not at all); the bytes
    /// written. Waits for a free slot of the client's concurrency bound first.
    pub async fn retrieve_instance(&self, r: &InstanceRef, dest: &Path) -> Result<u64, PullError> {
        let (url, sop) = self.instance_url(r)?;
        // The semaphore is never closed; if it were, going ahead unbounded is still correct.
        let _permit = self.permits.acquire().await.ok();
        let mut partial = dest.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let result = async {
            let mut file =
                tokio::fs::File::create(&partial)
                    .await
                    .map_err(|source| PullError::Io {
                        op: "create",
                        path: partial.clone(),
                        source,
                    })?;
            self.download(
                &url,
                sop,
                Sink::File {
                    file: &mut file,
                    path: &partial,
                },
            )
            .await
        }
        .await;
        let written = match result {
            Ok(n) => n,
            Err(e) => {
                // Best effort: a leftover is overwritten by the next attempt anyway.
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        };
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(|source| PullError::Io {
                op: "rename",
                path: dest.to_path_buf(),
                source,
            })?;
        sync_dir(dest).await?;
        Ok(written)
    }

    /// Retrieves the instance as a stream of [`Piece`]s on `out`: its Part 10 bytes as they
    /// arrive (parsed out of the multipart body, paced), then [`Piece::Done`] once the body
    /// ended well and its file meta names the instance asked for. A receiver must not keep
    /// anything without `Done` (the channel closing first means the retrieval failed). Waits
    /// for a free slot of the client's concurrency bound first; the bytes sent.
    pub async fn retrieve_into(
        &self,
        r: &InstanceRef,
        out: &mpsc::Sender<Piece>,
    ) -> Result<u64, PullError> {
        let (url, sop) = self.instance_url(r)?;
        // The semaphore is never closed; if it were, going ahead unbounded is still correct.
        let _permit = self.permits.acquire().await.ok();
        let written = self.download(&url, sop, Sink::Channel(out)).await?;
        out.send(Piece::Done)
            .await
            .map_err(|_| PullError::SinkClosed)?;
        Ok(written)
    }

    /// The WADO-RS URL of an instance and its (checked) SOP Instance UID.
    fn instance_url<'r>(&self, r: &'r InstanceRef) -> Result<(String, &'r str), PullError> {
        let uid = |uid, what| dicom_uid(uid).ok_or(PullError::BadUid { what });
        let study = uid(&r.study_uid, "study")?;
        let series = uid(&r.series_uid, "series")?;
        let sop = uid(&r.sop_instance_uid, "instance")?;
        let url = format!(
            "{}/studies/{study}/series/{series}/instances/{sop}",
            self.root
        );
        Ok((url, sop))
    }

    /// GET, parse and hand the part's bytes to `sink`; the bytes handed on. The file meta
    /// must name `sop`.
    async fn download(&self, url: &str, sop: &str, mut sink: Sink<'_>) -> Result<u64, PullError> {
        let request = "WADO-RS";
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, WADO_ACCEPT)
            .send()
            .await
            .map_err(|error| self.send_error(request, error))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(PullError::Status {
                request,
                root: self.root.clone(),
                status,
            });
        }
        let multipart_error = |source| PullError::Multipart {
            root: self.root.clone(),
            source,
        };
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let boundary = multipart::boundary(&content_type).map_err(multipart_error)?;
        let mut parser = Multipart::new(&boundary, self.limits.multipart);
        let mut out = Vec::new();
        let mut head = Vec::new();
        let mut written = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.read_error(request, error))?
        {
            self.pace(chunk.len()).await;
            out.clear();
            parser.feed(&chunk, &mut out).map_err(multipart_error)?;
            if head.len() < HEAD_BYTES {
                let take = (HEAD_BYTES - head.len()).min(out.len());
                head.extend_from_slice(out.get(..take).unwrap_or_default());
            }
            sink.put(&out).await?;
            written += out.len() as u64;
        }
        parser.finish().map_err(multipart_error)?;
        sink.finish().await?;
        let wrong = |reason| PullError::WrongInstance {
            root: self.root.clone(),
            reason,
        };
        let meta = dicom_object::FileMetaTable::from_reader(head.get(128..).unwrap_or_default())
            .map_err(|_| wrong("has no readable file meta group"))?;
        if meta
            .media_storage_sop_instance_uid()
            .trim_end_matches(['\0', ' '])
            != sop
        {
            return Err(wrong("is another instance than the one asked for"));
        }
        Ok(written)
    }

    /// Lists the study and retrieves every instance not yet in `dir` (as
    /// `{sop_instance_uid}.dcm`), up to the concurrency bound at once. On the first failure
    /// the retrievals still running are stopped and the error returned; the files already
    /// written stay, so calling it again resumes.
    pub async fn pull_study(&self, study_uid: &str, dir: &Path) -> Result<PullReport, PullError> {
        let refs = self.instances_of_study(study_uid).await?;
        let mut report = PullReport {
            listed: refs.len(),
            ..PullReport::default()
        };
        let mut tasks = JoinSet::new();
        for r in refs {
            let dest = dir.join(format!("{}.dcm", r.sop_instance_uid));
            let exists = tokio::fs::try_exists(&dest)
                .await
                .map_err(|source| PullError::Io {
                    op: "stat",
                    path: dest.clone(),
                    source,
                })?;
            if exists {
                report.skipped += 1;
                continue;
            }
            let client = self.clone();
            tasks.spawn(async move { client.retrieve_instance(&r, &dest).await });
        }
        while let Some(done) = tasks.join_next().await {
            report.bytes += done??;
            report.retrieved += 1;
        }
        debug!(
            retrieved = report.retrieved,
            skipped = report.skipped,
            "WADO-RS pulled the study"
        );
        Ok(report)
    }

    async fn pace(&self, bytes: usize) {
        if let Some(pacer) = &self.pacer {
            pacer.wait(bytes).await;
        }
    }

    fn send_error(&self, request: &'static str, error: reqwest::Error) -> PullError {
        PullError::Send {
            request,
            root: self.root.clone(),
            error: error.without_url(),
        }
    }

    fn read_error(&self, request: &'static str, error: reqwest::Error) -> PullError {
        PullError::ReadBody {
            request,
            root: self.root.clone(),
            error: error.without_url(),
        }
    }
}

/// fsyncs the folder holding `path` (so a rename into it is durable), off the async threads.
async fn sync_dir(path: &Path) -> Result<(), PullError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let for_error = dir.clone();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await?
        .map_err(|source| PullError::Io {
            op: "fsync folder",
            path: for_error,
            source,
        })
}

#[derive(Deserialize)]
struct QidoInstance {
    #[serde(rename = "0020000D")]
    study: Option<Attribute>,
    #[serde(rename = "0020000E")]
    series: Option<Attribute>,
    #[serde(rename = "00080018")]
    sop: Option<Attribute>,
}

#[derive(Deserialize)]
struct Attribute {
    #[serde(rename = "Value", default)]
    value: Vec<Option<String>>,
}

/// The first value of a UID attribute of result `index`, checked.
fn uid_of<'a>(
    attribute: Option<&'a Attribute>,
    index: usize,
    tag: &'static str,
) -> Result<&'a str, QidoError> {
    let value = attribute
        .and_then(|a| a.value.first())
        .and_then(Option::as_deref)
        .ok_or(QidoError::MissingTag { index, tag })?;
    dicom_uid(value).ok_or(QidoError::BadUid { index, tag })
}

/// The instances listed in a QIDO-RS response body (DICOM JSON model: an array of data sets;
/// an empty body is an empty list). Each needs Series Instance UID (0020000E) and SOP
/// Instance UID (00080018) as valid UIDs; a Study Instance UID (0020000D), when present,
/// must be `study_uid`.
pub fn parse_instances(body: &[u8], study_uid: &str) -> Result<Vec<InstanceRef>, QidoError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let items: Vec<QidoInstance> = serde_json::from_slice(body).map_err(|e| QidoError::Json {
        kind: match e.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "end of input",
        },
        line: e.line(),
        column: e.column(),
    })?;
    let study_uid = dicom_uid(study_uid).unwrap_or(study_uid);
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let uid = |attribute, tag| uid_of(attribute, index, tag);
            if item.study.is_some() && uid(item.study.as_ref(), "0020000D")? != study_uid {
                return Err(QidoError::OtherStudy { index });
            }
            Ok(InstanceRef {
                study_uid: study_uid.to_string(),
                series_uid: uid(item.series.as_ref(), "0020000E")?.to_string(),
                sop_instance_uid: uid(item.sop.as_ref(), "00080018")?.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_uids_are_refused_before_any_request() {
        // Nothing listens there; the refusal comes before any connection.
        let s = UplinkSettings::new("x".into(), "http://127.0.0.1:9".into(), None);
        let c = PullClient::new(&s, PullLimits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let r = InstanceRef {
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
            sop_instance_uid: "../../x".into(),
        };
        let dest = dir.path().join("x.dcm");
        assert!(matches!(
            c.retrieve_instance(&r, &dest).await,
            Err(PullError::BadUid { what: "instance" })
        ));
        assert!(!dest.exists());
        assert!(matches!(
            c.instances_of_study("1.2/3").await,
            Err(PullError::BadUid { what: "study" })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retrievals_keep_to_the_concurrency_bound() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;

        // A loopback server that holds each request 150 ms and counts how many it holds at
        // once, then answers 404 and closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (n, p) = (now.clone(), peak.clone());
        let server = tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let (n, p) = (n.clone(), p.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let k = sock.read(&mut buf).await.unwrap();
                        if k == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..k]);
                    }
                    let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(in_flight, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        let mut s = UplinkSettings::new("x".into(), format!("http://127.0.0.1:{port}"), None);
        s.max_concurrent_requests = 2;
        let c = PullClient::new(&s, PullLimits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = JoinSet::new();
        for i in 0..6 {
            let c = c.clone();
            let dest = dir.path().join(format!("{i}.dcm"));
            tasks.spawn(async move {
                let r = InstanceRef {
                    study_uid: "1.2".into(),
                    series_uid: "1.2.3".into(),
                    sop_instance_uid: format!("1.2.3.{i}"),
                };
                c.retrieve_instance(&r, &dest).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            assert!(matches!(
                r.unwrap(),
                Err(PullError::Status { status: 404, .. })
            ));
        }
        server.abort();
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn qido_instances_are_read() {
        let body = br#"[
          {"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
           "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
           "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]},
           "00100010": {"vr": "PN", "Value": [{"Alphabetic": "X^Y"}]}},
          {"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
           "00080018": {"vr": "UI", "Value": ["1.2.3.4.6\u0000"]}}
        ]"#;
        let refs = parse_instances(body, "1.2.3").unwrap();
        assert_eq!(
            refs,
            vec![
                InstanceRef {
                    study_uid: "1.2.3".into(),
                    series_uid: "1.2.3.4".into(),
                    sop_instance_uid: "1.2.3.4.5".into()
                },
                InstanceRef {
                    study_uid: "1.2.3".into(),
                    series_uid: "1.2.3.4".into(),
                    sop_instance_uid: "1.2.3.4.6".into()
                },
            ]
        );
        assert_eq!(parse_instances(b"", "1.2.3").unwrap(), vec![]);
        assert_eq!(parse_instances(b" []\n", "1.2.3").unwrap(), vec![]);
    }

    #[test]
    fn malformed_qido_responses_are_typed_errors() {
        type Check = fn(&QidoError) -> bool;
        let cases: [(&[u8], Check); 8] = [
            (b"<html>", |e| matches!(e, QidoError::Json { kind: "syntax", .. })),
            (b"[{", |e| matches!(e, QidoError::Json { kind: "end of input", .. })),
            (b"{}", |e| matches!(e, QidoError::Json { kind: "data", .. })),
            (br#"[{"00080018": {"Value": [5]}}]"#, |e| {
                matches!(e, QidoError::Json { kind: "data", .. })
            }),
            (br#"[{"00080018": {"Value": ["1.2"]}}]"#, |e| {
                *e == QidoError::MissingTag {
                    index: 0,
                    tag: "0020000E",
                }
            }),
            (
                br#"[{"0020000E": {"Value": ["1.2"]}, "00080018": {"vr": "UI"}}]"#,
                |e| {
                    *e == QidoError::MissingTag {
                        index: 0,
                        tag: "00080018",
                    }
                },
            ),
            (
                br#"[{"0020000E": {"Value": ["1.2"]}, "00080018": {"Value": ["../../etc"]}}]"#,
                |e| {
                    *e == QidoError::BadUid {
                        index: 0,
                        tag: "00080018",
                    }
                },
            ),
            (
                br#"[{"0020000D": {"Value": ["9.9"]}, "0020000E": {"Value": ["1.2"]}, "00080018": {"Value": ["1.3"]}}]"#,
                |e| *e == QidoError::OtherStudy { index: 0 },
            ),
        ];
        for (body, check) in cases {
            let e = parse_instances(body, "1.2.3").unwrap_err();
            assert!(check(&e), "{}: {e:?}", String::from_utf8_lossy(body));
            // The message never quotes the body.
            assert!(!e.to_string().contains("etc"), "{e}");
        }
    }
}
