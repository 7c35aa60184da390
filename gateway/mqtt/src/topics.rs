//! The subscriptions of a session: MQTT topic filters, checked once when the session is
//! configured, kept in the order given (each becomes its own SUBSCRIBE, in that order,
//! after every ConnAck) and without repeats.

use std::fmt;

/// A topic filter that is not valid MQTT 3.1.1 (section 4.7): empty, over 65535 bytes,
/// with NUL, or with `+` / `#` not alone in their level (`#` only last).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MQTT topic filter {filter:?} is not valid: {why}")]
pub struct InvalidFilter {
    /// The filter (topics carry ids and fixed words only, never patient data).
    pub filter: String,
    pub why: &'static str,
}

/// Checks one topic filter (MQTT 3.1.1, 4.7.1).
pub fn check_filter(filter: &str) -> Result<(), InvalidFilter> {
    let invalid = |why| {
        Err(InvalidFilter {
            filter: filter.to_owned(),
            why,
        })
    };
    if filter.is_empty() {
        return invalid("empty");
    }
    if filter.len() > usize::from(u16::MAX) {
        return invalid("longer than 65535 bytes");
    }
    if filter.contains('\0') {
        return invalid("contains NUL");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len().saturating_sub(1);
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return invalid("'#' must be a whole level, and the last");
        }
        if level.contains('+') && *level != "+" {
            return invalid("'+' must be a whole level");
        }
    }
    Ok(())
}

/// Checks a topic to publish on: a valid filter without wildcards.
pub fn check_topic(topic: &str) -> Result<(), InvalidFilter> {
    check_filter(topic)?;
    if topic.contains(['+', '#']) {
        return Err(InvalidFilter {
            filter: topic.to_owned(),
            why: "a topic to publish on has no wildcards",
        });
    }
    Ok(())
}

/// The filters a session subscribes to (QoS 1) on every ConnAck, in order, each once.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TopicSet(Vec<String>);

impl TopicSet {
    /// No subscriptions.
    pub fn new() -> TopicSet {
        TopicSet(Vec::new())
    }

    /// Adds `filter` after the others (a repeat is ignored).
    pub fn add(&mut self, filter: impl Into<String>) -> Result<(), InvalidFilter> {
        let filter = filter.into();
        check_filter(&filter)?;
        if !self.0.contains(&filter) {
            self.0.push(filter);
        }
        Ok(())
    }

    /// The filters in subscription order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for TopicSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_their_order_and_a_repeat_is_subscribed_once() {
        let mut set = TopicSet::new();
        for f in [
            "bk/core-1/status",
            "bk/core-1/slots/+",
            "bk/clinic-a/resp/core-1/+",
            "bk/core-1/status",
        ] {
            set.add(f).unwrap();
        }
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [
                "bk/core-1/status",
                "bk/core-1/slots/+",
                "bk/clinic-a/resp/core-1/+"
            ]
        );
        assert_eq!(set.len(), 3);
        assert!(!set.is_empty() && TopicSet::new().is_empty());
    }

    #[test]
    fn wildcards_are_accepted_only_as_whole_levels() {
        for ok in [
            "gw/d/cmd/+/+",
            "prov/c/cmd/provision/+",
            "#",
            "a/#",
            "+",
            "a//b",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "+a/b", "a\0b", "##"] {
            assert!(check_filter(bad).is_err(), "{bad:?}");
            assert!(TopicSet::new().add(bad).is_err(), "{bad:?}");
        }
        assert!(check_filter(&"a".repeat(65536)).is_err());
        assert_eq!(check_topic("gw/d/status"), Ok(()));
        assert!(check_topic("gw/+/status").is_err() && check_topic("gw/#").is_err());
    }
}
