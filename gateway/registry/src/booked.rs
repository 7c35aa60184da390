//! The patient of a clinic's booking as a registry source record: the kiosk's DICOM-style
//! person name (`alphabetic=ideographic=phonetic`, components `^`) split into the kanji and
//! kana fields, the birth date and sex as booked.

use gateway_identity::Record;

/// The source record of a booked patient at `hospital_id` (the booking clinic).
pub fn booked_patient(
    hospital_id: &str,
    patient_id: &str,
    person_name: &str,
    birth_date: &str,
    sex: &str,
) -> Record {
    let mut groups = person_name.split('=');
    let alphabetic = groups.next().unwrap_or("");
    let ideographic = groups.next().unwrap_or("");
    let phonetic = groups.next().unwrap_or("");
    // No kanji group: the alphabetic one is the name as written (e.g. a kiosk without IME).
    let (family, given) = split(if ideographic.is_empty() {
        alphabetic
    } else {
        ideographic
    });
    let (family_kana, given_kana) = split(phonetic);
    Record {
        hospital_id: some(hospital_id),
        patient_id: some(patient_id),
        family_name: family,
        given_name: given,
        family_kana,
        given_kana,
        sex: some(sex),
        birth_date: some(birth_date),
        ..Record::default()
    }
}

fn split(group: &str) -> (Option<String>, Option<String>) {
    let mut parts = group.split('^');
    (
        some(parts.next().unwrap_or("")),
        some(parts.next().unwrap_or("")),
    )
}

fn some(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_booked_name_splits_into_kanji_and_kana_fields() {
        let r = booked_patient(
            "clinic-a",
            "P1",
            "YAMADA^HANAKO=山田^花子=やまだ^はなこ",
            "1961-04-02",
            "female",
        );
        assert_eq!(r.hospital_id.as_deref(), Some("clinic-a"));
        assert_eq!(r.patient_id.as_deref(), Some("P1"));
        assert_eq!(r.family_name.as_deref(), Some("山田"));
        assert_eq!(r.given_name.as_deref(), Some("花子"));
        assert_eq!(r.family_kana.as_deref(), Some("やまだ"));
        assert_eq!(r.given_kana.as_deref(), Some("はなこ"));
        assert_eq!(r.birth_date.as_deref(), Some("1961-04-02"));
        assert_eq!(r.sex.as_deref(), Some("female"));
    }

    #[test]
    fn an_alphabetic_only_name_fills_the_name_fields_and_empty_parts_are_missing() {
        let r = booked_patient("c", "P2", "SATO^", "", "");
        assert_eq!(r.family_name.as_deref(), Some("SATO"));
        assert_eq!(r.given_name, None);
        assert_eq!(r.family_kana, None);
        assert_eq!(r.birth_date, None);
    }
}
