//! The profile of one destination: the Basic Application Level Confidentiality Profile of
//! PS3.15 Table E.1-1 and the options a destination turned on, resolved to one action per
//! attribute.

use std::fmt;
use std::str::FromStr;

use crate::table::TABLE_E1_1;

/// The Basic Profile column of Table E.1-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basic {
    D,
    Z,
    X,
    K,
    C,
    U,
    /// Z unless D is required to keep the IOD valid.
    ZD,
    /// X unless Z is required.
    XZ,
    /// X unless D is required.
    XD,
    /// X unless Z or D is required.
    XZD,
    /// X unless Z or replacement of contained instance UIDs (U) is required.
    XZU,
}

/// One option column of Table E.1-1 (empty: the option does not change the attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opt {
    None,
    K,
    C,
    X,
    D,
    Z,
    U,
}

/// One row of Table E.1-1: a tag pattern (`tag & mask == row.tag`; `xx` digits of the
/// standard are zero in both) and its actions.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub tag: u32,
    pub mask: u32,
    pub basic: Basic,
    /// In the order of [`OPTIONS`].
    pub options: [Opt; 10],
    pub name: &'static str,
}

/// The option columns of Table E.1-1, in the table's order, by their config names
/// (`deidentify_options`, snake_case of the column titles).
pub const OPTIONS: [ProfileOption; 10] = [
    ProfileOption::RetainSafePrivate,
    ProfileOption::RetainUids,
    ProfileOption::RetainDeviceIdentity,
    ProfileOption::RetainInstitutionIdentity,
    ProfileOption::RetainPatientCharacteristics,
    ProfileOption::RetainLongitudinalTemporalInformationFullDates,
    ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
    ProfileOption::CleanDescriptors,
    ProfileOption::CleanStructuredContent,
    ProfileOption::CleanGraphics,
];

/// An option of PS3.15 Table E.1-1 (and its code in CID 7050).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileOption {
    RetainSafePrivate,
    RetainUids,
    RetainDeviceIdentity,
    RetainInstitutionIdentity,
    RetainPatientCharacteristics,
    RetainLongitudinalTemporalInformationFullDates,
    RetainLongitudinalTemporalInformationModifiedDates,
    CleanDescriptors,
    CleanStructuredContent,
    CleanGraphics,
}

impl ProfileOption {
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::RetainSafePrivate => "retain_safe_private",
            Self::RetainUids => "retain_uids",
            Self::RetainDeviceIdentity => "retain_device_identity",
            Self::RetainInstitutionIdentity => "retain_institution_identity",
            Self::RetainPatientCharacteristics => "retain_patient_characteristics",
            Self::RetainLongitudinalTemporalInformationFullDates => {
                "retain_longitudinal_temporal_information_full_dates"
            }
            Self::RetainLongitudinalTemporalInformationModifiedDates => {
                "retain_longitudinal_temporal_information_modified_dates"
            }
            Self::CleanDescriptors => "clean_descriptors",
            Self::CleanStructuredContent => "clean_structured_content",
            Self::CleanGraphics => "clean_graphics",
        }
    }

    /// Code Value and Code Meaning in CID 7050 (coding scheme DCM).
    pub fn code(self) -> (&'static str, &'static str) {
        match self {
            Self::RetainSafePrivate => ("113111", "Retain Safe Private Option"),
            Self::RetainUids => ("113110", "Retain UIDs Option"),
            Self::RetainDeviceIdentity => ("113109", "Retain Device Identity Option"),
            Self::RetainInstitutionIdentity => ("113112", "Retain Institution Identity Option"),
            Self::RetainPatientCharacteristics => {
                ("113108", "Retain Patient Characteristics Option")
            }
            Self::RetainLongitudinalTemporalInformationFullDates => (
                "113106",
                "Retain Longitudinal Temporal Information Full Dates Option",
            ),
            Self::RetainLongitudinalTemporalInformationModifiedDates => (
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            Self::CleanDescriptors => ("113105", "Clean Descriptors Option"),
            Self::CleanStructuredContent => ("113104", "Clean Structured Content Option"),
            Self::CleanGraphics => ("113103", "Clean Graphics Option"),
        }
    }

    fn column(self) -> usize {
        OPTIONS.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// An option name that is not one of Table E.1-1's, or one this gateway cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error(
        "unknown de-identification option {0:?} (the options of PS3.15 Table E.1-1: retain_uids, retain_device_identity, retain_institution_identity, retain_patient_characteristics, retain_longitudinal_temporal_information_full_dates, retain_longitudinal_temporal_information_modified_dates, clean_descriptors, clean_structured_content, clean_graphics)"
    )]
    Unknown(String),
    #[error(
        "de-identification option retain_safe_private is not supported: the gateway has no safe private attribute list (PS3.15 Table E.3.10-1), so every private attribute is removed"
    )]
    SafePrivate,
    #[error(
        "de-identification options retain_longitudinal_temporal_information_full_dates and ..._modified_dates exclude each other"
    )]
    BothDateOptions,
}

impl FromStr for ProfileOption {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let option = OPTIONS
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| OptionError::Unknown(s.chars().take(80).collect()))?;
        if option == Self::RetainSafePrivate {
            return Err(OptionError::SafePrivate);
        }
        Ok(option)
    }
}

impl fmt::Display for ProfileOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to one attribute, after the options are applied. The compound actions of
/// the Basic Profile are resolved towards validity (an attribute present in the input may
/// be required by its IOD): Z/D, X/D and X/Z/D become D, X/Z becomes Z, X/Z/U* becomes U
/// for UIDs (else Z).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace with a non-zero-length dummy value of the same VR.
    Dummy,
    /// Replace with a zero-length value (a sequence: no items).
    Zero,
    /// Remove.
    Remove,
    /// Keep (a sequence: its items are still processed).
    Keep,
    /// Clean: dates and date-times shifted, text kept only if it names nothing of the
    /// subject, sequences processed item by item, anything else kept.
    Clean,
    /// Replace each UID with the destination's keyed pseudonymous UID.
    Uid,
}

/// A destination's resolved profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    options: Vec<ProfileOption>,
}

impl Profile {
    /// The Basic Profile with `options` (duplicates ignored).
    pub fn new(options: &[ProfileOption]) -> Result<Self, OptionError> {
        let mut options = options.to_vec();
        options.sort();
        options.dedup();
        if options.contains(&ProfileOption::RetainSafePrivate) {
            return Err(OptionError::SafePrivate);
        }
        if options.contains(&ProfileOption::RetainLongitudinalTemporalInformationFullDates)
            && options.contains(&ProfileOption::RetainLongitudinalTemporalInformationModifiedDates)
        {
            return Err(OptionError::BothDateOptions);
        }
        Ok(Self { options })
    }

    /// The options turned on, in table order.
    pub fn options(&self) -> &[ProfileOption] {
        &self.options
    }

    /// Whether an option is on.
    pub fn has(&self, option: ProfileOption) -> bool {
        self.options.contains(&option)
    }

    /// Dates are shifted per patient (the modified-dates option).
    pub fn shifts_dates(&self) -> bool {
        self.has(ProfileOption::RetainLongitudinalTemporalInformationModifiedDates)
    }

    /// The row of Table E.1-1 for a tag, if any (exact tags before patterns).
    pub fn row(tag: u32) -> Option<&'static Row> {
        TABLE_E1_1
            .iter()
            .find(|r| r.mask == u32::MAX && r.tag == tag)
            .or_else(|| TABLE_E1_1.iter().find(|r| tag & r.mask == r.tag))
    }

    /// The action for a public (even group) attribute; `None` when Table E.1-1 does not
    /// name it (the attribute is kept). Private attributes are removed by the caller
    /// (retain_safe_private is not supported). Among the options that name the attribute,
    /// K wins over C, C over the other entries (an option asked to keep something).
    pub fn action(&self, tag: u32, is_uid: bool) -> Option<Action> {
        let row = Self::row(tag)?;
        let mut chosen: Option<Opt> = None;
        for option in &self.options {
            let entry = row
                .options
                .get(option.column())
                .copied()
                .unwrap_or(Opt::None);
            chosen = match (chosen, entry) {
                (_, Opt::None) => chosen,
                (None, e) => Some(e),
                (Some(Opt::K), _) => Some(Opt::K),
                (_, Opt::K) => Some(Opt::K),
                (Some(Opt::C), _) => Some(Opt::C),
                (_, Opt::C) => Some(Opt::C),
                (Some(c), _) => Some(c),
            };
        }
        Some(match chosen {
            Some(Opt::K) => Action::Keep,
            Some(Opt::C) => Action::Clean,
            Some(Opt::X) => Action::Remove,
            Some(Opt::D) => Action::Dummy,
            Some(Opt::Z) => Action::Zero,
            Some(Opt::U) => Action::Uid,
            Some(Opt::None) | None => match row.basic {
                Basic::D | Basic::ZD | Basic::XD | Basic::XZD => Action::Dummy,
                Basic::Z | Basic::XZ => Action::Zero,
                Basic::X => Action::Remove,
                Basic::K => Action::Keep,
                Basic::C => Action::Clean,
                Basic::U => Action::Uid,
                Basic::XZU if is_uid => Action::Uid,
                Basic::XZU => Action::Zero,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_profile_actions_follow_the_table() {
        let p = Profile::new(&[]).unwrap();
        assert_eq!(p.action(0x0010_0010, false), Some(Action::Zero)); // Patient's Name Z
        assert_eq!(p.action(0x0008_0018, true), Some(Action::Uid)); // SOP Instance UID U
        assert_eq!(p.action(0x0010_0030, false), Some(Action::Zero)); // Patient's Birth Date Z
        assert_eq!(p.action(0x0008_0080, false), Some(Action::Dummy)); // Institution Name X/Z/D
        assert_eq!(p.action(0x0028_0010, false), None); // Rows: not in the table
        assert_eq!(p.action(0x6002_3000, false), Some(Action::Remove)); // Overlay Data 60xx
        assert_eq!(p.action(0x5000_0010, false), Some(Action::Remove)); // Curve data 50xx
    }

    #[test]
    fn options_override_the_basic_profile() {
        let p = Profile::new(&[
            ProfileOption::RetainLongitudinalTemporalInformationModifiedDates,
            ProfileOption::RetainDeviceIdentity,
        ])
        .unwrap();
        assert_eq!(p.action(0x0008_0020, false), Some(Action::Clean)); // Study Date
        assert_eq!(p.action(0x0018_1000, false), Some(Action::Keep)); // Device Serial Number
        let uids = Profile::new(&[ProfileOption::RetainUids]).unwrap();
        assert_eq!(uids.action(0x0020_000D, true), Some(Action::Keep));
    }

    #[test]
    fn option_names_parse_and_refuse() {
        assert_eq!(
            "clean_descriptors".parse::<ProfileOption>(),
            Ok(ProfileOption::CleanDescriptors)
        );
        assert_eq!(
            "retain_safe_private".parse::<ProfileOption>(),
            Err(OptionError::SafePrivate)
        );
        assert!(matches!(
            "retain_everything".parse::<ProfileOption>(),
            Err(OptionError::Unknown(_))
        ));
        assert_eq!(
            Profile::new(&[
                ProfileOption::RetainLongitudinalTemporalInformationFullDates,
                ProfileOption::RetainLongitudinalTemporalInformationModifiedDates
            ]),
            Err(OptionError::BothDateOptions)
        );
    }
}
