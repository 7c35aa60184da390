//! What the registry reads from an HL7 v2 ADT message (pure: text in, [`Adt`] out).
//!
//! Events: A01, A04, A08, A28, A31 create or update the source record; A40 merges MRG-1
//! (the prior id) into PID-3 (the survivor); A47 changes MRG-1 (the old id) to PID-3 (the
//! new one). Anything else is ignored (with a reason from fixed texts, never content).
//!
//! Read (unescaped values; empty = missing):
//! - hospital: MSH-4.1 (sending facility), else MSH-3.1 (sending application); neither:
//!   the core's own `[identity] hospital_id` (its own RIS and ADT).
//! - patient id: PID-3, the first repetition whose CX.5 (identifier type) is `MR` or `PI`
//!   with a CX.1, else the first repetition with a CX.1. MRG-1 likewise.
//! - names: PID-5 repetitions by XPN.8 (name representation, JAHIS): `I` (ideographic,
//!   kanji) -> `family_name`/`given_name`, `P` (phonetic, kana) -> `family_kana`/
//!   `given_kana`, `A` (alphabetic) or none -> `family_name`/`given_name` when no `I`
//!   repetition gave them. XPN.1 family (its first sub-component), XPN.2 given.
//! - PID-7.1 birth date: its first 8 characters when they are digits (YYYYMMDD).
//! - PID-8 sex (as sent). PID-11 first repetition: XAD.5 `postal_code`; `address` = XAD.4
//!   (prefecture) + XAD.3 (city) + XAD.1 (street) + XAD.2 (other, e.g. building), joined
//!   without separators as Japanese addresses are written. PID-13 first repetition: XTN.1,
//!   else XTN.12 (unformatted), else XTN.6 + XTN.7 (area code + number).
//! - IN1 (first): IN1-3.1 `insurer_number` (保険者番号), IN1-10.1 `insurance_symbol` (記号),
//!   IN1-11.1 `insurance_number` (番号). The branch (枝番) is not read from HL7.
//! - CON (each; consent to share, 公開同意): CON-2.1 the kind among `identity`, `results`,
//!   `reactions`, `dose`, `images` or `all` (ASCII case-insensitive; others ignored);
//!   CON-11.1 status `A` = active (a grant), `R` (refused) or `X` (rescinded) = revoke;
//!   CON-9.1, when present, names the one hospital granted, else the whole region.

use gateway_hl7::parse::{Message, parse};
use gateway_identity::Record;

use crate::api::{DataKind, Grant, Grantee};

/// What an ADT asks of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A01/A04/A08/A28/A31.
    Upsert,
    /// A40: the record with this prior id is merged into the message's patient.
    Merge { prior: String },
    /// A47: the record with this old id is now the message's patient id.
    ChangeId { old: String },
}

/// An ADT as the registry reads it. `Debug` shows no values.
#[derive(Clone, PartialEq)]
pub struct Adt {
    pub event: Event,
    /// MSH-4 / MSH-3; `None`: the core's own.
    pub hospital: Option<String>,
    pub patient_id: String,
    pub record: Record,
    /// Grants read from active CON segments.
    pub grants: Vec<Grant>,
    /// A CON segment refused or rescinded consent.
    pub revoke: bool,
}

impl std::fmt::Debug for Adt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adt")
            .field("event", &matches!(self.event, Event::Upsert))
            .field("grants", &self.grants.len())
            .field("revoke", &self.revoke)
            .finish_non_exhaustive()
    }
}

/// Unescaped component `c` of repetition `r` of `seg`-`f` (first segment of that name);
/// `None` when absent or empty.
fn value(msg: &Message<'_>, seg: &str, f: usize, r: usize, c: usize) -> Option<String> {
    let v = msg
        .segment(seg)?
        .field(f)?
        .repetition(r)?
        .component(c)?
        .value();
    let v = v.trim().to_owned();
    (!v.is_empty()).then_some(v)
}

fn non_empty(s: String) -> Option<String> {
    let s = s.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// The id of a CX list field (PID-3, MRG-1): `MR`/`PI` typed first, else the first.
pub fn cx_id(msg: &Message<'_>, seg: &str, f: usize) -> Option<String> {
    let field = msg.segment(seg)?.field(f)?;
    let ids: Vec<(String, String)> = field
        .repetitions()
        .filter_map(|r| {
            let id = non_empty(unescape_component(&r, 1)?)?;
            Some((id, r.value(5).trim().to_ascii_uppercase()))
        })
        .collect();
    ids.iter()
        .find(|(_, t)| t == "MR" || t == "PI")
        .or(ids.first())
        .map(|(id, _)| id.clone())
}

fn unescape_component(r: &gateway_hl7::parse::Repetition<'_>, c: usize) -> Option<String> {
    r.component(c)
        .map(|c| c.subcomponent(1).map(|s| s.value()).unwrap_or_default())
}

/// Reads an ADT; `Err` says (in fixed words) why the registry ignores it.
pub fn read(text: &str) -> Result<Adt, &'static str> {
    let msg = parse(text).map_err(|_| "not a parsable HL7 message")?;
    if msg.get("MSH", 9, 1, 1, 1) != Some("ADT") {
        return Err("not an ADT message");
    }
    let trigger = msg.get("MSH", 9, 1, 2, 1).unwrap_or("");
    let hospital = sender(&msg);
    let patient_id = cx_id(&msg, "PID", 3).ok_or("no patient id in PID-3")?;
    let event = match trigger {
        "A01" | "A04" | "A08" | "A28" | "A31" => Event::Upsert,
        "A40" => Event::Merge {
            prior: cx_id(&msg, "MRG", 1).ok_or("no prior patient id in MRG-1")?,
        },
        "A47" => Event::ChangeId {
            old: cx_id(&msg, "MRG", 1).ok_or("no old patient id in MRG-1")?,
        },
        _ => return Err("an ADT event the registry does not read"),
    };
    let mut record = demographics(&msg);
    record.patient_id = Some(patient_id.clone());
    let (grants, revoke) = consents(&msg);
    Ok(Adt {
        event,
        hospital,
        patient_id,
        record,
        grants,
        revoke,
    })
}

/// Sub-component 1 of component 1 (HD namespace id), unescaped.
/// The sending hospital of a message: MSH-4.1, else MSH-3.1 (`None`: the core's own).
pub fn sender(msg: &Message<'_>) -> Option<String> {
    first_sub(msg, "MSH", 4).or_else(|| first_sub(msg, "MSH", 3))
}

fn first_sub(msg: &Message<'_>, seg: &str, f: usize) -> Option<String> {
    let r = msg.segment(seg)?.field(f)?.repetition(1)?;
    non_empty(unescape_component(&r, 1)?)
}

fn demographics(msg: &Message<'_>) -> Record {
    let mut r = Record::default();
    if let Some(names) = msg.segment("PID").and_then(|s| s.field(5)) {
        let mut plain: Option<(Option<String>, Option<String>)> = None;
        let mut kanji = false;
        for rep in names.repetitions() {
            let family = unescape_component(&rep, 1).and_then(non_empty);
            let given = non_empty(rep.value(2));
            if family.is_none() && given.is_none() {
                continue;
            }
            match rep.value(8).trim() {
                "I" => {
                    kanji = true;
                    r.family_name = family;
                    r.given_name = given;
                }
                "P" => {
                    if r.family_kana.is_none() && r.given_kana.is_none() {
                        r.family_kana = family;
                        r.given_kana = given;
                    }
                }
                _ => {
                    if plain.is_none() {
                        plain = Some((family, given));
                    }
                }
            }
        }
        if !kanji && let Some((family, given)) = plain {
            r.family_name = family;
            r.given_name = given;
        }
    }
    r.birth_date = value(msg, "PID", 7, 1, 1).and_then(|t| {
        let d: String = t.chars().take(8).collect();
        (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit())).then_some(d)
    });
    r.sex = value(msg, "PID", 8, 1, 1);
    r.postal_code = value(msg, "PID", 11, 1, 5);
    let address: String = [4, 3, 1, 2]
        .iter()
        .filter_map(|c| value(msg, "PID", 11, 1, *c))
        .collect();
    r.address = non_empty(address);
    r.phone = value(msg, "PID", 13, 1, 1)
        .or_else(|| value(msg, "PID", 13, 1, 12))
        .or_else(|| {
            let local = value(msg, "PID", 13, 1, 7)?;
            Some(format!(
                "{}{local}",
                value(msg, "PID", 13, 1, 6).unwrap_or_default()
            ))
        });
    r.insurer_number = value(msg, "IN1", 3, 1, 1);
    r.insurance_symbol = value(msg, "IN1", 10, 1, 1);
    r.insurance_number = value(msg, "IN1", 11, 1, 1);
    r
}

/// The grants of active CON segments (merged per grantee), and whether one revokes.
fn consents(msg: &Message<'_>) -> (Vec<Grant>, bool) {
    let mut grants: Vec<Grant> = Vec::new();
    let mut revoke = false;
    for con in msg.segments_named("CON") {
        let comp = |f: usize| {
            con.field(f)
                .and_then(|f| f.repetition(1))
                .map(|r| r.value(1).trim().to_owned())
                .unwrap_or_default()
        };
        let kinds: Vec<DataKind> = match comp(2).to_ascii_lowercase().as_str() {
            "identity" => vec![DataKind::Identity],
            "results" => vec![DataKind::Results],
            "reactions" => vec![DataKind::Reactions],
            "dose" => vec![DataKind::Dose],
            "images" => vec![DataKind::Images],
            "all" => vec![
                DataKind::Identity,
                DataKind::Results,
                DataKind::Reactions,
                DataKind::Dose,
                DataKind::Images,
            ],
            _ => continue,
        };
        match comp(11).to_ascii_uppercase().as_str() {
            "A" => {
                let hospital = comp(9);
                let grantee = if hospital.is_empty() {
                    Grantee::Region
                } else {
                    Grantee::Hospital(hospital)
                };
                match grants.iter_mut().find(|g| g.grantee == grantee) {
                    Some(g) => {
                        for k in kinds {
                            if !g.kinds.contains(&k) {
                                g.kinds.push(k);
                            }
                        }
                    }
                    None => grants.push(Grant { grantee, kinds }),
                }
            }
            "R" | "X" => revoke = true,
            _ => {}
        }
    }
    (grants, revoke)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KANA_KANJI: &str = "MSH|^~\\&|EMR|HOSP-B|GW|CORE|20270101||ADT^A01|1|P|2.5||||||~ISO IR87\r\
PID|1||0042^^^HOSP-B^PI~X9^^^^XX||山田^太郎^^^^^L^I~ヤマダ^タロウ^^^^^L^P||19800102|M|||1-2-3^メゾン101^港区^東京都^1050001||03-1234-5678\r\
IN1|1||06123456|||||||記号1|番号2\r\
CON|1|identity\r\
CON|2|results|||||||||A\r\
CON|3|dose|||||||HOSP-C||A\r";

    #[test]
    fn an_a01_gives_the_jahis_names_dates_address_phone_insurance_and_consent() {
        let adt = read(KANA_KANJI).unwrap();
        assert_eq!(adt.event, Event::Upsert);
        assert_eq!(adt.hospital.as_deref(), Some("HOSP-B"));
        assert_eq!(adt.patient_id, "0042");
        let r = &adt.record;
        assert_eq!(r.family_name.as_deref(), Some("山田"));
        assert_eq!(r.given_name.as_deref(), Some("太郎"));
        assert_eq!(r.family_kana.as_deref(), Some("ヤマダ"));
        assert_eq!(r.given_kana.as_deref(), Some("タロウ"));
        assert_eq!(r.birth_date.as_deref(), Some("19800102"));
        assert_eq!(r.sex.as_deref(), Some("M"));
        assert_eq!(r.postal_code.as_deref(), Some("1050001"));
        assert_eq!(r.address.as_deref(), Some("東京都港区1-2-3メゾン101"));
        assert_eq!(r.phone.as_deref(), Some("03-1234-5678"));
        assert_eq!(r.insurer_number.as_deref(), Some("06123456"));
        assert_eq!(r.insurance_symbol.as_deref(), Some("記号1"));
        assert_eq!(r.insurance_number.as_deref(), Some("番号2"));
        // CON-1 has no status: not a grant. CON-2 region results, CON-3 one hospital.
        assert_eq!(
            adt.grants,
            vec![
                Grant {
                    grantee: Grantee::Region,
                    kinds: vec![DataKind::Results]
                },
                Grant {
                    grantee: Grantee::Hospital("HOSP-C".into()),
                    kinds: vec![DataKind::Dose]
                },
            ]
        );
        assert!(!adt.revoke);
        assert!(!format!("{adt:?}").contains("山田"));
    }

    #[test]
    fn merge_and_id_change_read_mrg_1_and_the_sender_falls_back_to_msh_3() {
        let a40 = "MSH|^~\\&|RIS||GW||20270101||ADT^A40|1|P|2.5\rPID|1||NEW^^^^MR\rMRG|OLD^^^^MR\r";
        let adt = read(a40).unwrap();
        assert_eq!(adt.hospital.as_deref(), Some("RIS"));
        assert_eq!(
            adt.event,
            Event::Merge {
                prior: "OLD".into()
            }
        );
        let a47 = a40.replace("A40", "A47");
        assert_eq!(
            read(&a47).unwrap().event,
            Event::ChangeId { old: "OLD".into() }
        );
        let own = "MSH|^~\\&|||GW||20270101||ADT^A08|1|P|2.5\rPID|1||7\rCON|1|all|||||||||X\r";
        let adt = read(own).unwrap();
        assert_eq!(adt.hospital, None);
        assert!(adt.revoke);
        assert!(adt.grants.is_empty());
    }

    #[test]
    fn malformed_or_other_messages_are_ignored_with_a_reason_and_never_panic() {
        for text in [
            "",
            "garbage",
            "MSH|^~\\&|A|B|C|D|1||ORU^R01|1|P|2.5\rPID|1||7\r",
            "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r",
            "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1||^^^^MR\r",
            "MSH|^~\\&|A|B|C|D|1||ADT^A40|1|P|2.5\rPID|1||7\r",
            "MSH|^~\\&|A|B|C|D|1||ADT^A99|1|P|2.5\rPID|1||7\r",
            "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1||7||~~^^^^^^^^|日本語|||~~~\rIN1\rCON||\r",
        ] {
            let _ = read(text);
        }
        assert!(read("garbage").is_err());
        assert!(read("MSH|^~\\&|A|B|C|D|1||ADT^A40|1|P|2.5\rPID|1||7\r").is_err());
        let odd = read("MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1||7||~~^^^^^^^^|日本語|||~~~\r")
            .unwrap();
        assert_eq!(odd.record.birth_date, None);
    }

    #[test]
    fn ten_thousand_seeded_mutations_of_an_adt_never_panic() {
        let base: Vec<char> = KANA_KANJI.chars().collect();
        let alphabet: Vec<char> = "|^~\\&\r\nA0PIDCONMRGIN1 ヤ山\u{0}".chars().collect();
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        let mut read_ok = 0;
        for _ in 0..10_000 {
            let mut text = base.clone();
            for _ in 0..1 + next(6) {
                let at = next(text.len());
                match next(3) {
                    0 => {
                        text.remove(at);
                    }
                    1 => text.insert(at, alphabet[next(alphabet.len())]),
                    _ => text[at] = alphabet[next(alphabet.len())],
                }
            }
            let text: String = text.into_iter().collect();
            if read(&text).is_ok() {
                read_ok += 1;
            }
        }
        // Most mutations keep a readable ADT: the reader is exercised, not just refusing.
        assert!(read_ok > 1000, "{read_ok}");
    }
}
