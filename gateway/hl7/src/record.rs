//! The message header and the typed clinical records the gateway recognises.
//!
//! [`Header::read`] never fails (it takes what is there, for acknowledgements);
//! [`Header::validate`] enforces the fields the gateway needs before accepting a message:
//! MSH-9.1, MSH-10, MSH-11 (P, D or T), MSH-12 (a 2.x version).
//!
//! [`extract`] turns a recognised message into a [`Clinical`] record:
//! ADT^A01/A04/A08 (patient, with its AL1 allergies), ADT^A40 (merge), ADT^A60 (allergies,
//! IAM), OMG^O19 / OMI^O23 (radiology orders), ORU^R01 (reports); `None` for every other
//! type. Values are unescaped.
//!
//! Allergies are checked as the listener needs to answer AE/AR: every IAM (ADT^A60) needs an
//! allergen code or text in IAM-3 (101 at IAM-3) and an action code in IAM-6 (101 when
//! empty; 103 when not `A` add, `U` update, `D` delete or `X` no change, HL7 table 0323);
//! every AL1 needs an allergen code or text in AL1-3 (101 at AL1-3).
//!
//! Names (PID-5, XPN): each repetition is classified by XPN-8 (name representation code,
//! HL7 table 4000: `A` alphabetic, `I` ideographic, `P` phonetic). Without XPN-8 a name that is
//! all ASCII is alphabetic, otherwise the JAHIS / SS-MIX2 convention applies: the first
//! repetition is the kanji (ideographic) name, the second the kana (phonetic) name.
//!
//! Privacy: every type holding patient data implements `Debug` by hand and prints counts
//! and `<redacted>` only, so `{:?}` in a log line cannot leak names, IDs, dates, codes or
//! order numbers.

use std::fmt;

use crate::parse::{Delimiters, ErrorCode, Location, Message, ParseError, Repetition, Segment};

/// The MSH fields the gateway works with. Values are raw (as in the message, still escaped
/// in its delimiters) so they can be copied into an acknowledgement unchanged. No patient
/// data lives here, so `Debug` is derived.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The message's delimiters.
    pub delimiters: Delimiters,
    /// MSH-3 (whole field).
    pub sending_app: String,
    /// MSH-4.
    pub sending_facility: String,
    /// MSH-5.
    pub receiving_app: String,
    /// MSH-6.
    pub receiving_facility: String,
    /// MSH-9.1, e.g. `ADT`.
    pub message_type: String,
    /// MSH-9.2, e.g. `A08`.
    pub trigger: String,
    /// MSH-9.3, e.g. `ADT_A01`.
    pub structure: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11 (whole field; component 1 is the processing ID).
    pub processing_id: String,
    /// MSH-12 (whole field; component 1 is the version ID).
    pub version: String,
    /// MSH-18 (all repetitions).
    pub charset: String,
    /// MSH-15.
    pub accept_ack: String,
    /// MSH-16.
    pub app_ack: String,
}

impl Header {
    /// Reads the header of a parsed message; absent fields are empty.
    pub fn read(message: &Message<'_>) -> Self {
        let Some(msh) = message.msh() else {
            return Self::default();
        };
        let comp = |n: usize, c: usize| {
            msh.field(n)
                .and_then(|f| f.repetition(1))
                .and_then(|r| r.component(c))
                .map(|c| c.raw().to_owned())
                .unwrap_or_default()
        };
        Self {
            delimiters: *message.delimiters(),
            sending_app: msh.raw(3).to_owned(),
            sending_facility: msh.raw(4).to_owned(),
            receiving_app: msh.raw(5).to_owned(),
            receiving_facility: msh.raw(6).to_owned(),
            message_type: comp(9, 1),
            trigger: comp(9, 2),
            structure: comp(9, 3),
            control_id: msh.raw(10).to_owned(),
            processing_id: msh.raw(11).to_owned(),
            version: msh.raw(12).to_owned(),
            charset: msh.raw(18).to_owned(),
            accept_ack: msh.raw(15).to_owned(),
            app_ack: msh.raw(16).to_owned(),
        }
    }

    /// Reads the header straight from a raw frame whose MSH segment is plain ASCII, for
    /// answering a frame whose body could not be decoded. `None` if the MSH segment is not
    /// ASCII or does not parse.
    pub fn from_raw_frame(frame: &[u8]) -> Option<Self> {
        let end = frame
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(frame.len());
        let msh = frame.get(..end)?;
        if !msh.is_ascii() || msh.contains(&0x1B) {
            return None;
        }
        let text = std::str::from_utf8(msh).ok()?;
        crate::parse::parse(text).ok().map(|m| Self::read(&m))
    }

    /// MSH-11.1.
    pub fn processing_id_code(&self) -> &str {
        first_component(&self.processing_id, &self.delimiters)
    }

    /// MSH-12.1.
    pub fn version_id(&self) -> &str {
        first_component(&self.version, &self.delimiters)
    }

    /// Checks the fields the gateway requires before accepting a message.
    pub fn validate(&self) -> Result<(), ParseError> {
        let at = |f| Some(Location::field("MSH", 1, f));
        if self.message_type.is_empty() {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                at(9),
                "MSH-9 message type missing",
            ));
        }
        if self.control_id.is_empty() {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                at(10),
                "MSH-10 message control ID missing",
            ));
        }
        if self.processing_id.is_empty() {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                at(11),
                "MSH-11 processing ID missing",
            ));
        }
        if self.version.is_empty() {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                at(12),
                "MSH-12 version ID missing",
            ));
        }
        if !matches!(self.processing_id_code(), "P" | "D" | "T") {
            return Err(ParseError::new(
                ErrorCode::UnsupportedProcessingId,
                at(11),
                "MSH-11 processing ID is not P, D or T",
            ));
        }
        let v = self.version_id();
        let supported = v.strip_prefix("2.").is_some_and(|minor| {
            !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        });
        if !supported {
            return Err(ParseError::new(
                ErrorCode::UnsupportedVersionId,
                at(12),
                "MSH-12 version is not an HL7 v2.x version",
            ));
        }
        Ok(())
    }
}

fn first_component<'s>(raw: &'s str, d: &Delimiters) -> &'s str {
    raw.split(d.component)
        .next()
        .unwrap_or_default()
        .split(d.repetition)
        .next()
        .unwrap_or_default()
}

/// Writes `Name { field: <redacted>, list: n items }` style output.
macro_rules! redacted_debug {
    ($ty:ident { $($field:ident),* ; $($list:ident),* }) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct(stringify!($ty));
                $( d.field(stringify!($field), &Redacted(self.$field.is_empty())); )*
                $( d.field(stringify!($list), &format_args!("{} items", self.$list.len())); )*
                d.finish()
            }
        }
    };
}

/// Prints `<redacted>` for a present value and `<empty>` for an absent one.
struct Redacted(bool);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "<empty>" } else { "<redacted>" })
    }
}

/// A patient identifier (PID-3 / MRG-1 repetition, CX).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PatientId {
    /// CX-1.
    pub id: String,
    /// CX-4.1 (assigning authority namespace).
    pub assigning_authority: String,
    /// CX-5 (identifier type code, e.g. `PI`, `MR`).
    pub id_type: String,
}
redacted_debug!(PatientId { id, assigning_authority, id_type ; });

/// How a name is written (XPN-8, HL7 table 4000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRepresentation {
    /// `A`: alphabetic (romaji / Latin).
    Alphabetic,
    /// `I`: ideographic (kanji).
    Ideographic,
    /// `P`: phonetic (kana).
    Phonetic,
    /// No code and no convention applies.
    Unspecified,
}

/// A person name (PID-5 repetition, XPN).
#[derive(Clone, PartialEq, Eq)]
pub struct PersonName {
    /// XPN-1.1 (surname).
    pub family: String,
    /// XPN-2.
    pub given: String,
    /// XPN-3 (middle names or initials).
    pub middle: String,
    /// XPN-7 (name type code, e.g. `L` legal).
    pub name_type: String,
    /// From XPN-8 or the JAHIS convention.
    pub representation: NameRepresentation,
}

impl fmt::Debug for PersonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersonName")
            .field("family", &Redacted(self.family.is_empty()))
            .field("given", &Redacted(self.given.is_empty()))
            .field("middle", &Redacted(self.middle.is_empty()))
            .field("name_type", &Redacted(self.name_type.is_empty()))
            .field("representation", &self.representation)
            .finish()
    }
}

/// The patient of a message (PID).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Patient {
    /// PID-3 repetitions.
    pub ids: Vec<PatientId>,
    /// PID-5 repetitions.
    pub names: Vec<PersonName>,
    /// PID-7.1 as written (`YYYY[MM[DD...]]`).
    pub birth_date: String,
    /// PID-8 (administrative sex).
    pub sex: String,
}
redacted_debug!(Patient { birth_date, sex ; ids, names });

impl Patient {
    /// The first name written in this representation.
    pub fn name(&self, representation: NameRepresentation) -> Option<&PersonName> {
        self.names
            .iter()
            .find(|n| n.representation == representation)
    }
}

/// A coded value (CE/CWE: identifier ^ text ^ coding system).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Coded {
    /// Component 1.
    pub code: String,
    /// Component 2.
    pub text: String,
    /// Component 3.
    pub system: String,
}
redacted_debug!(Coded { code, text, system ; });

impl Coded {
    fn is_empty(&self) -> bool {
        self.code.is_empty() && self.text.is_empty() && self.system.is_empty()
    }
}

/// One allergy (IAM segment of ADT^A60, or AL1 segment of ADT^A01/A04/A08). The AL1 and
/// IAM fields 2 to 5 are the same; the rest is read from the segment that has it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Allergy {
    /// IAM-2 / AL1-2 allergen type code (e.g. `DA` drug, `FA` food).
    pub allergen_type: Coded,
    /// IAM-3 / AL1-3 allergen code / mnemonic / description.
    pub allergen: Coded,
    /// IAM-4 / AL1-4 severity code (e.g. `SV`, `MO`, `MI`).
    pub severity: Coded,
    /// IAM-5 / AL1-5 reactions (repetitions).
    pub reactions: Vec<String>,
    /// IAM-6 allergy action code (`A` add, `D` delete, `U` update, `X` no change); empty
    /// for AL1.
    pub action: String,
    /// IAM-7.1 allergy unique identifier (EI.1); empty for AL1.
    pub unique_id: String,
    /// IAM-11 onset date (as written); empty for AL1.
    pub onset_date: String,
    /// IAM-13.1 reported date/time (as written); empty for AL1.
    pub reported: String,
    /// AL1-6 identification date (as written); empty for IAM.
    pub identified: String,
}

impl fmt::Debug for Allergy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allergy")
            .field("allergen_type", &Redacted(self.allergen_type.is_empty()))
            .field("allergen", &Redacted(self.allergen.is_empty()))
            .field("severity", &Redacted(self.severity.is_empty()))
            .field("reactions", &format_args!("{} items", self.reactions.len()))
            .field("action", &Redacted(self.action.is_empty()))
            .field("unique_id", &Redacted(self.unique_id.is_empty()))
            .field("onset_date", &Redacted(self.onset_date.is_empty()))
            .field("reported", &Redacted(self.reported.is_empty()))
            .field("identified", &Redacted(self.identified.is_empty()))
            .finish()
    }
}

/// One radiology order (ORC with its OBR / IPC).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Order {
    /// ORC-1 order control (e.g. `NW`, `CA`, `XO`).
    pub order_control: String,
    /// ORC-2.1 (or OBR-2.1 when ORC-2 is empty).
    pub placer_order_number: String,
    /// ORC-3.1 (or OBR-3.1).
    pub filler_order_number: String,
    /// IPC-1.1 for OMI, else OBR-18.
    pub accession_number: String,
    /// OBR-4 universal service identifier.
    pub requested_procedure: Coded,
    /// IPC-5.1 for OMI, else OBR-24 (diagnostic service section, often the modality).
    pub modality: String,
    /// IPC-3 study instance UID (OMI).
    pub study_instance_uid: String,
}
redacted_debug!(Order { order_control, placer_order_number, filler_order_number, accession_number, modality, study_instance_uid ; });

/// One report (OBR with its OBX segments, ORU^R01).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// OBR-2.1.
    pub placer_order_number: String,
    /// OBR-3.1.
    pub filler_order_number: String,
    /// OBR-18 (accession number by convention).
    pub accession_number: String,
    /// OBR-4.
    pub procedure: Coded,
    /// OBR-25 result status.
    pub result_status: String,
    /// OBX-11 of each OBX, in order.
    pub observation_statuses: Vec<String>,
}
redacted_debug!(Report { placer_order_number, filler_order_number, accession_number, result_status ; observation_statuses });

/// Which ADT event a patient record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdtEvent {
    /// A01 admit / visit notification.
    A01,
    /// A04 register a patient.
    A04,
    /// A08 update patient information.
    A08,
}

/// Which order message an order record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderMessage {
    /// OMG^O19 general clinical order.
    OmgO19,
    /// OMI^O23 imaging order.
    OmiO23,
}

/// A recognised message, typed. `Debug` never prints patient data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clinical {
    /// ADT^A01 / ADT^A04 / ADT^A08.
    Patient {
        /// A01, A04 or A08.
        event: AdtEvent,
        /// PID.
        patient: Patient,
        /// AL1 segments, in order (action empty: an AL1 list states the allergies as the
        /// sender knows them).
        allergies: Vec<Allergy>,
    },
    /// ADT^A40 merge: one entry per PID/MRG pair.
    Merge {
        /// (surviving patient, prior identifiers from MRG-1).
        merges: Vec<(Patient, Vec<PatientId>)>,
    },
    /// ADT^A60 allergies.
    Allergies {
        /// PID.
        patient: Patient,
        /// IAM segments.
        allergies: Vec<Allergy>,
    },
    /// OMG^O19 / OMI^O23.
    Orders {
        /// Which message.
        message: OrderMessage,
        /// PID, when present.
        patient: Option<Patient>,
        /// One per ORC.
        orders: Vec<Order>,
    },
    /// ORU^R01.
    Reports {
        /// PID, when present.
        patient: Option<Patient>,
        /// One per OBR.
        reports: Vec<Report>,
    },
}

/// Extracts the typed record of a recognised message type; `Ok(None)` for other types.
/// Errors: 100 when a required segment is missing, 101 when PID-3 or MRG-1 is empty, and
/// the allergy checks of the module docs (101 / 103 at IAM-3, IAM-6, AL1-3).
pub fn extract(message: &Message<'_>) -> Result<Option<Clinical>, ParseError> {
    let header = Header::read(message);
    let record = match (header.message_type.as_str(), header.trigger.as_str()) {
        ("ADT", "A01") | ("ADT", "A04") | ("ADT", "A08") => {
            let event = match header.trigger.as_str() {
                "A01" => AdtEvent::A01,
                "A04" => AdtEvent::A04,
                _ => AdtEvent::A08,
            };
            let patient = patient(required(message, "PID")?)?;
            let allergies = message
                .segments_named("AL1")
                .enumerate()
                .map(|(i, seg)| al1(seg, i + 1))
                .collect::<Result<_, _>>()?;
            Clinical::Patient {
                event,
                patient,
                allergies,
            }
        }
        ("ADT", "A40") => {
            let mut merges = Vec::new();
            let mut current: Option<Patient> = None;
            let mut pid_seq = 0;
            let mut mrg_seq = 0;
            for seg in message.segments() {
                match seg.name() {
                    "PID" => {
                        pid_seq += 1;
                        current = Some(patient_at(seg, pid_seq)?);
                    }
                    "MRG" => {
                        mrg_seq += 1;
                        let Some(p) = current.take() else {
                            return Err(ParseError::new(
                                ErrorCode::SegmentSequenceError,
                                Some(Location::segment("MRG", mrg_seq)),
                                "MRG without a preceding PID",
                            ));
                        };
                        let prior = ids(seg, 1);
                        if prior.is_empty() {
                            return Err(ParseError::new(
                                ErrorCode::RequiredFieldMissing,
                                Some(Location::field("MRG", mrg_seq, 1)),
                                "MRG-1 prior patient identifier missing",
                            ));
                        }
                        merges.push((p, prior));
                    }
                    _ => {}
                }
            }
            if merges.is_empty() {
                return Err(ParseError::new(
                    ErrorCode::SegmentSequenceError,
                    Some(Location::segment("MRG", 1)),
                    "ADT^A40 without a PID/MRG pair",
                ));
            }
            Clinical::Merge { merges }
        }
        ("ADT", "A60") => {
            let patient = patient(required(message, "PID")?)?;
            let allergies = message
                .segments_named("IAM")
                .enumerate()
                .map(|(i, seg)| iam(seg, i + 1))
                .collect::<Result<_, _>>()?;
            Clinical::Allergies { patient, allergies }
        }
        ("OMG", "O19") | ("OMI", "O23") => {
            let kind = if header.message_type == "OMG" {
                OrderMessage::OmgO19
            } else {
                OrderMessage::OmiO23
            };
            required(message, "ORC")?;
            let patient = message.segment("PID").map(patient).transpose()?;
            Clinical::Orders {
                message: kind,
                patient,
                orders: orders(message, kind),
            }
        }
        ("ORU", "R01") => {
            required(message, "OBR")?;
            let patient = message.segment("PID").map(patient).transpose()?;
            Clinical::Reports {
                patient,
                reports: reports(message),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(record))
}

fn required<'m>(message: &'m Message<'_>, name: &'static str) -> Result<Segment<'m>, ParseError> {
    message.segment(name).ok_or_else(|| {
        ParseError::new(
            ErrorCode::SegmentSequenceError,
            Some(Location::segment(name, 1)),
            "required segment missing",
        )
    })
}

/// Unescaped component `c` of repetition 1 of field `f`.
fn value(seg: Segment<'_>, f: usize, c: usize) -> String {
    seg.field(f)
        .and_then(|field| field.repetition(1))
        .map(|r| r.value(c))
        .unwrap_or_default()
}

/// Unescaped sub-component 1 of component `c` of a repetition.
fn sub1(rep: &Repetition<'_>, c: usize) -> String {
    rep.component(c)
        .and_then(|comp| comp.subcomponent(1))
        .map(|s| s.value())
        .unwrap_or_default()
}

fn coded(seg: Segment<'_>, f: usize) -> Coded {
    Coded {
        code: value(seg, f, 1),
        text: value(seg, f, 2),
        system: value(seg, f, 3),
    }
}

fn ids(seg: Segment<'_>, f: usize) -> Vec<PatientId> {
    let Some(field) = seg.field(f) else {
        return Vec::new();
    };
    field
        .repetitions()
        .map(|r| PatientId {
            id: sub1(&r, 1),
            assigning_authority: sub1(&r, 4),
            id_type: sub1(&r, 5),
        })
        .filter(|id| !id.id.is_empty())
        .collect()
}

fn patient(seg: Segment<'_>) -> Result<Patient, ParseError> {
    patient_at(seg, 1)
}

fn patient_at(seg: Segment<'_>, sequence: usize) -> Result<Patient, ParseError> {
    let ids = ids(seg, 3);
    if ids.is_empty() {
        return Err(ParseError::new(
            ErrorCode::RequiredFieldMissing,
            Some(Location::field("PID", sequence, 3)),
            "PID-3 patient identifier list empty",
        ));
    }
    let names = seg
        .field(5)
        .map(|f| {
            f.repetitions()
                .enumerate()
                .filter(|(_, r)| !r.raw().is_empty())
                .map(|(i, r)| person_name(&r, i))
                .collect()
        })
        .unwrap_or_default();
    Ok(Patient {
        ids,
        names,
        birth_date: value(seg, 7, 1),
        sex: value(seg, 8, 1),
    })
}

fn person_name(rep: &Repetition<'_>, index: usize) -> PersonName {
    let family = sub1(rep, 1);
    let given = rep.value(2);
    let middle = rep.value(3);
    let representation = match rep.value(8).as_str() {
        "A" => NameRepresentation::Alphabetic,
        "I" => NameRepresentation::Ideographic,
        "P" => NameRepresentation::Phonetic,
        _ if rep.raw().is_ascii() => NameRepresentation::Alphabetic,
        _ => match index {
            0 => NameRepresentation::Ideographic,
            1 => NameRepresentation::Phonetic,
            _ => NameRepresentation::Unspecified,
        },
    };
    PersonName {
        family,
        given,
        middle,
        name_type: rep.value(7),
        representation,
    }
}

/// Fields 2 to 5, common to IAM and AL1; an allergen with neither code nor text is 101.
fn allergy_common(seg: Segment<'_>, sequence: usize) -> Result<Allergy, ParseError> {
    let allergen = coded(seg, 3);
    if allergen.code.is_empty() && allergen.text.is_empty() {
        return Err(ParseError::new(
            ErrorCode::RequiredFieldMissing,
            Some(Location::field(seg.name(), sequence, 3)),
            "allergen code and text both missing",
        ));
    }
    Ok(Allergy {
        allergen_type: coded(seg, 2),
        allergen,
        severity: coded(seg, 4),
        reactions: seg
            .field(5)
            .map(|f| {
                f.repetitions()
                    .map(|r| r.value(1))
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        ..Allergy::default()
    })
}

/// IAM (ADT^A60): the common fields, IAM-6 action (table 0323), IAM-7 id, IAM-11, IAM-13.
fn iam(seg: Segment<'_>, sequence: usize) -> Result<Allergy, ParseError> {
    let mut a = allergy_common(seg, sequence)?;
    a.action = value(seg, 6, 1);
    match a.action.as_str() {
        "A" | "U" | "D" | "X" => {}
        "" => {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                Some(Location::field("IAM", sequence, 6)),
                "IAM-6 allergy action code missing",
            ));
        }
        _ => {
            return Err(ParseError::new(
                ErrorCode::TableValueNotFound,
                Some(Location::field("IAM", sequence, 6)),
                "IAM-6 allergy action code is not A, U, D or X",
            ));
        }
    }
    a.unique_id = value(seg, 7, 1);
    a.onset_date = value(seg, 11, 1);
    a.reported = value(seg, 13, 1);
    Ok(a)
}

/// AL1 (ADT^A01/A04/A08): the common fields and AL1-6 identification date.
fn al1(seg: Segment<'_>, sequence: usize) -> Result<Allergy, ParseError> {
    let mut a = allergy_common(seg, sequence)?;
    a.identified = value(seg, 6, 1);
    Ok(a)
}

fn orders(message: &Message<'_>, kind: OrderMessage) -> Vec<Order> {
    let mut orders: Vec<Order> = Vec::new();
    for seg in message.segments() {
        match seg.name() {
            "ORC" => orders.push(Order {
                order_control: value(seg, 1, 1),
                placer_order_number: value(seg, 2, 1),
                filler_order_number: value(seg, 3, 1),
                ..Order::default()
            }),
            "OBR" => {
                if let Some(o) = orders.last_mut() {
                    if o.placer_order_number.is_empty() {
                        o.placer_order_number = value(seg, 2, 1);
                    }
                    if o.filler_order_number.is_empty() {
                        o.filler_order_number = value(seg, 3, 1);
                    }
                    o.requested_procedure = coded(seg, 4);
                    if kind == OrderMessage::OmgO19 || o.accession_number.is_empty() {
                        o.accession_number = value(seg, 18, 1);
                    }
                    if o.modality.is_empty() {
                        o.modality = value(seg, 24, 1);
                    }
                }
            }
            "IPC" => {
                if let Some(o) = orders.last_mut() {
                    let accession = value(seg, 1, 1);
                    if !accession.is_empty() {
                        o.accession_number = accession;
                    }
                    o.study_instance_uid = value(seg, 3, 1);
                    let modality = value(seg, 5, 1);
                    if !modality.is_empty() {
                        o.modality = modality;
                    }
                }
            }
            _ => {}
        }
    }
    orders
}

fn reports(message: &Message<'_>) -> Vec<Report> {
    let mut reports: Vec<Report> = Vec::new();
    for seg in message.segments() {
        match seg.name() {
            "OBR" => reports.push(Report {
                placer_order_number: value(seg, 2, 1),
                filler_order_number: value(seg, 3, 1),
                accession_number: value(seg, 18, 1),
                procedure: coded(seg, 4),
                result_status: value(seg, 25, 1),
                observation_statuses: Vec::new(),
            }),
            "OBX" => {
                if let Some(r) = reports.last_mut() {
                    r.observation_statuses.push(value(seg, 11, 1));
                }
            }
            _ => {}
        }
    }
    reports
}
