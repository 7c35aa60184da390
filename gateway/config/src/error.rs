//! What a rejected config reports: a list of [`Problem`]s, each naming the TOML key.

use std::fmt;

/// One thing wrong with a config file: the TOML key path (`dicom.listen`,
/// `dicom.peers[0].host`, `uplink[1].url`, or `config` for the file as a whole) and a
/// message that quotes only the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in one pass over a config; never empty when returned as an error.
/// `Display` prints one `key: message` line per problem (no trailing newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl ConfigErrors {
    /// Wraps a single problem.
    pub fn one(problem: Problem) -> Self {
        Self {
            problems: vec![problem],
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_display_is_one_line_per_problem() {
        let errors = ConfigErrors {
            problems: vec![
                Problem::new("dicom.listen", "invalid socket address \"x\""),
                Problem::new("spool.max_bytes", "invalid size \"20 gigs\""),
            ],
        };
        assert_eq!(
            errors.to_string(),
            "dicom.listen: invalid socket address \"x\"\nspool.max_bytes: invalid size \"20 gigs\""
        );
    }
}
