//! DICOM instances transferred, per study, for the audit trail: what an association
//! stored (tallied while it runs, handed over once at its end on the service's transfer
//! sink, [`crate::DicomService::with_transfer_audit`]) and what a sender had confirmed by
//! its receiver (a STOW-RS batch, a C-STORE delivery: [`identify_part10`] reads the
//! identifiers of the Part 10 bytes sent). The receiver of the sink (gatewayd) appends the
//! audit records on a blocking thread. The Patient ID and Study UID are patient data:
//! `Debug` shows neither, and nothing here logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::part10;
use crate::walker::{Encoding, Walker};

/// Where transfers go for the audit trail.
pub type TransferSink = tokio::sync::mpsc::Sender<Transfer>;

/// The instances of one study stored in one association.
#[derive(Clone, PartialEq, Eq)]
pub struct StudyTransfer {
    /// Patient ID (0010,0020) of the first instance of the study (empty when absent).
    pub patient_id: String,
    /// Study Instance UID (empty when the instances carried none).
    pub study_uid: String,
    /// SOP Class UID and number of instances stored (duplicates included: they were
    /// received and acknowledged).
    pub sop_classes: Vec<(String, u64)>,
}

impl std::fmt::Debug for StudyTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudyTransfer")
            .field("sop_classes", &self.sop_classes)
            .finish_non_exhaustive()
    }
}

/// Which way instances went, and with whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Stored by the gateway's SCP from this peer.
    Received {
        calling_ae: String,
        peer: SocketAddr,
    },
    /// Sent by the gateway and confirmed by this destination (its configured name).
    Sent { destination: String },
}

/// One transfer: everything an association stored, or a confirmed batch a sender sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub direction: Direction,
    /// One entry per study, in Study UID order.
    pub studies: Vec<StudyTransfer>,
}

/// Instances counted per study and SOP class.
#[derive(Debug, Default)]
pub struct Tally {
    studies: BTreeMap<String, (String, BTreeMap<String, u64>)>,
}

impl Tally {
    /// Counts one instance.
    pub fn add(&mut self, study: Option<&str>, patient: Option<&str>, sop_class: &str) {
        let (_, classes) = self
            .studies
            .entry(study.unwrap_or_default().to_string())
            .or_insert_with(|| (patient.unwrap_or_default().to_string(), BTreeMap::new()));
        *classes.entry(sop_class.to_string()).or_insert(0) += 1;
    }

    /// Counts one Part 10 object by what [`identify_part10`] reads from it; an object it
    /// cannot read is counted under an empty study and SOP class.
    pub fn add_part10(&mut self, bytes: &[u8]) {
        match identify_part10(bytes) {
            Some(id) => self.add(
                id.study_uid.as_deref(),
                id.patient_id.as_deref(),
                &id.sop_class_uid,
            ),
            None => self.add(None, None, ""),
        }
    }

    /// The transfer of everything counted (`None` when nothing was), emptying the tally.
    pub fn take_as(&mut self, direction: Direction) -> Option<Transfer> {
        if self.studies.is_empty() {
            return None;
        }
        let studies = std::mem::take(&mut self.studies)
            .into_iter()
            .map(|(study_uid, (patient_id, classes))| StudyTransfer {
                patient_id,
                study_uid,
                sop_classes: classes.into_iter().collect(),
            })
            .collect();
        Some(Transfer { direction, studies })
    }

    /// [`Tally::take_as`] for what an association received.
    pub(crate) fn take(&mut self, calling_ae: &str, peer: SocketAddr) -> Option<Transfer> {
        self.take_as(Direction::Received {
            calling_ae: calling_ae.to_string(),
            peer,
        })
    }
}

/// What a Part 10 object says of itself for the audit trail. `Debug` omits the Patient ID.
#[derive(Clone, PartialEq, Eq)]
pub struct Part10Identity {
    pub sop_class_uid: String,
    pub study_uid: Option<String>,
    pub patient_id: Option<String>,
}

impl std::fmt::Debug for Part10Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part10Identity")
            .field("sop_class_uid", &self.sop_class_uid)
            .finish_non_exhaustive()
    }
}

/// Reads the SOP Class UID, Study Instance UID and Patient ID of a Part 10 object (file
/// meta group, then a walk of the data set in its transfer syntax); `None` when the bytes
/// are not a Part 10 object this reader understands.
pub fn identify_part10(bytes: &[u8]) -> Option<Part10Identity> {
    let meta = part10::read(bytes).ok()?;
    let mut walker = Walker::new(Encoding::of_transfer_syntax(&meta.transfer_syntax_uid));
    walker.feed(bytes.get(meta.data_set_offset..)?).ok()?;
    let summary = walker.finish().ok()?;
    Some(Part10Identity {
        sop_class_uid: meta.sop_class_uid,
        study_uid: summary.study_instance_uid,
        patient_id: summary.patient_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_counted_per_study_and_sop_class() {
        let mut t = Tally::default();
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(t.take("CT01", peer).is_none());
        t.add(Some("1.2.3"), Some("PID-1"), "1.2.840.10008.5.1.4.1.1.2");
        t.add(Some("1.2.3"), Some("PID-1"), "1.2.840.10008.5.1.4.1.1.2");
        t.add(Some("1.2.3"), Some("PID-1"), "1.2.840.10008.5.1.4.1.1.7");
        t.add(Some("1.2.4"), None, "1.2.840.10008.5.1.4.1.1.2");
        let got = t.take("CT01", peer).unwrap();
        assert_eq!(
            got.direction,
            Direction::Received {
                calling_ae: "CT01".into(),
                peer
            }
        );
        assert_eq!(got.studies.len(), 2);
        assert_eq!(got.studies[0].study_uid, "1.2.3");
        assert_eq!(got.studies[0].patient_id, "PID-1");
        assert_eq!(
            got.studies[0].sop_classes,
            vec![
                ("1.2.840.10008.5.1.4.1.1.2".to_string(), 2),
                ("1.2.840.10008.5.1.4.1.1.7".to_string(), 1)
            ]
        );
        assert_eq!(got.studies[1].patient_id, "");
        assert!(!format!("{got:?}").contains("PID-1"));
        assert!(t.take("CT01", peer).is_none());
    }

    /// An Explicit VR Little Endian element with a 2-byte length.
    fn short(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(group.to_le_bytes());
        v.extend(element.to_le_bytes());
        v.extend(vr);
        v.extend(u16::try_from(value.len()).unwrap().to_le_bytes());
        v.extend(value);
        v
    }

    #[test]
    fn a_part10_object_is_identified_and_counted() {
        const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
        const ELE: &str = "1.2.840.10008.1.2.1";
        let mut ds = short(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        ds.extend(short(0x0008, 0x0018, b"UI", b"1.2.3.4"));
        ds.extend(short(0x0010, 0x0020, b"LO", b"PID-9 "));
        ds.extend(short(0x0020, 0x000D, b"UI", b"1.2.3.9\0"));
        let mut file = part10::header(CT, "1.2.3.4", ELE).unwrap();
        file.extend(&ds);
        let id = identify_part10(&file).unwrap();
        assert_eq!(id.sop_class_uid, CT);
        assert_eq!(id.study_uid.as_deref(), Some("1.2.3.9"));
        assert_eq!(id.patient_id.as_deref(), Some("PID-9"));
        assert!(!format!("{id:?}").contains("PID-9"));
        assert!(identify_part10(&ds).is_none(), "not Part 10");
        assert!(
            identify_part10(&file[..file.len() - 3]).is_none(),
            "truncated"
        );

        let mut t = Tally::default();
        t.add_part10(&file);
        t.add_part10(&file);
        t.add_part10(b"garbage");
        let got = t
            .take_as(Direction::Sent {
                destination: "cloud".into(),
            })
            .unwrap();
        assert_eq!(got.studies.len(), 2);
        assert_eq!(got.studies[0].study_uid, "", "the unreadable object");
        assert_eq!(got.studies[1].study_uid, "1.2.3.9");
        assert_eq!(got.studies[1].sop_classes, vec![(CT.to_string(), 2)]);
    }
}
