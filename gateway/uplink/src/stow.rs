//! DICOMweb STOW-RS (PS3.18 10.5): the multipart request body and the per-instance result.

use std::collections::HashMap;

use serde_json::Value;

/// Why a STOW request brought no whole HTTP response: a destination error (the batch stays
/// queued and is retried with backoff). `Display` is the whole cause chain (a TLS alert
/// says why a handshake failed), as `spool status` shows it; it names the URL only through
/// the transport's own message, never object content.
#[derive(Debug, thiserror::Error)]
pub enum StowError {
    /// Connecting, the TLS handshake, sending the body or waiting for the status failed.
    #[error("{}", crate::describe(error))]
    Send {
        /// `{url}/studies` of the destination.
        url: String,
        error: reqwest::Error,
    },
    /// The archive answered with `status` but its body could not be read to its end.
    #[error("{}", crate::describe(error))]
    ReadBody {
        url: String,
        status: u16,
        error: reqwest::Error,
    },
}

/// One instance in a STOW request.
#[derive(Debug, Clone)]
pub struct Part {
    pub sop_instance_uid: String,
    /// A DICOM Part 10 file.
    pub bytes: bytes::Bytes,
}

/// What the archive said about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceResult {
    /// Stored (or already held identically).
    Stored,
    /// Refused; `retry` when the failure reason says it is transient (A7xx: out of resources).
    Failed { reason: u16, retry: bool },
    /// Not mentioned in the response: not confirmed, so it is sent again later.
    Unconfirmed,
}

/// A random multipart boundary.
pub fn boundary() -> String {
    let mut raw = [0u8; 16];
    // A boundary only has to be absent from the parts; a fixed fallback is still unique
    // enough against DICOM content if the random source ever fails.
    if getrandom::getrandom(&mut raw).is_err() {
        raw = *b"gatewayd-stow-rs";
    }
    format!("gatewayd-{}", hex::encode(raw))
}

/// `Content-Type` of the request.
pub fn content_type(boundary: &str) -> String {
    format!("multipart/related; type=\"application/dicom\"; boundary={boundary}")
}

/// The pieces of the multipart body, in order (so they can be streamed and paced).
pub fn body_pieces(parts: &[Part], boundary: &str) -> Vec<bytes::Bytes> {
    let mut out = Vec::with_capacity(parts.len() * 2 + 1);
    for part in parts {
        out.push(bytes::Bytes::from(format!(
            "--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
        )));
        out.push(part.bytes.clone());
        out.push(bytes::Bytes::from_static(b"\r\n"));
    }
    out.push(bytes::Bytes::from(format!("--{boundary}--\r\n")));
    out
}

/// Reads the per-instance outcome from a STOW response (`application/dicom+json`):
/// ReferencedSOPSequence (0008,1199) items are stored, FailedSOPSequence (0008,1198) items
/// carry a FailureReason (0008,1197). Instances in neither are unconfirmed.
pub fn parse_response(body: &[u8], sent: &[String]) -> HashMap<String, InstanceResult> {
    let mut results: HashMap<String, InstanceResult> = sent
        .iter()
        .map(|uid| (uid.clone(), InstanceResult::Unconfirmed))
        .collect();
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return results;
    };
    // Some archives wrap the data set in a one-element array.
    let dataset = match &json {
        Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
        other => other.clone(),
    };
    for item in sequence(&dataset, "00081199") {
        if let Some(uid) = string(item, "00081155")
            && let Some(r) = results.get_mut(&uid)
        {
            *r = InstanceResult::Stored;
        }
    }
    for item in sequence(&dataset, "00081198") {
        if let Some(uid) = string(item, "00081155") {
            let reason = number(item, "00081197").unwrap_or(0xC000);
            if let Some(r) = results.get_mut(&uid) {
                *r = InstanceResult::Failed {
                    reason,
                    retry: reason & 0xFF00 == 0xA700,
                };
            }
        }
    }
    results
}

fn sequence<'a>(dataset: &'a Value, tag: &str) -> impl Iterator<Item = &'a Value> {
    dataset
        .get(tag)
        .and_then(|e| e.get("Value"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn string(item: &Value, tag: &str) -> Option<String> {
    item.get(tag)?
        .get("Value")?
        .as_array()?
        .first()?
        .as_str()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

fn number(item: &Value, tag: &str) -> Option<u16> {
    item.get(tag)?
        .get("Value")?
        .as_array()?
        .first()?
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn body_is_a_multipart_related_of_the_parts() {
        let parts = vec![
            Part {
                sop_instance_uid: "1.2".into(),
                bytes: bytes::Bytes::from_static(b"AAA"),
            },
            Part {
                sop_instance_uid: "1.3".into(),
                bytes: bytes::Bytes::from_static(b"BB"),
            },
        ];
        let body: Vec<u8> = body_pieces(&parts, "XYZ").concat();
        assert_eq!(
            body,
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--XYZ\r\nContent-Type: application/dicom\r\n\r\nBB\r\n--XYZ--\r\n"
        );
        assert_eq!(
            content_type("XYZ"),
            "multipart/related; type=\"application/dicom\"; boundary=XYZ"
        );
        assert_ne!(boundary(), boundary());
    }

    #[test]
    fn response_marks_each_instance_on_its_own() {
        let body = br#"{
          "00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
             "00081155": {"vr": "UI", "Value": ["1.1"]}}]},
          "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2"]}, "00081197": {"vr": "US", "Value": [49152]}},
            {"00081155": {"vr": "UI", "Value": ["1.3"]}, "00081197": {"vr": "US", "Value": [42752]}}]}
        }"#;
        let sent = vec!["1.1".into(), "1.2".into(), "1.3".into(), "1.4".into()];
        let r = parse_response(body, &sent);
        assert_eq!(r["1.1"], InstanceResult::Stored);
        assert_eq!(
            r["1.2"],
            InstanceResult::Failed {
                reason: 0xC000,
                retry: false
            }
        );
        assert_eq!(
            r["1.3"],
            InstanceResult::Failed {
                reason: 0xA700,
                retry: true
            }
        );
        assert_eq!(r["1.4"], InstanceResult::Unconfirmed);
    }

    #[test]
    fn garbage_response_confirms_nothing() {
        let r = parse_response(b"<html>oops</html>", &["1.1".into()]);
        assert_eq!(r["1.1"], InstanceResult::Unconfirmed);
    }
}
