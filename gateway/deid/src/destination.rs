//! One de-identifying destination: its profile, pseudonym key and the shared
//! re-identification map, applied to one stored object as it leaves.

use std::sync::Arc;

use crate::map::{MapError, ReidMap};
use crate::profile::Profile;
use crate::pseudonym::DestinationKey;
use crate::stream::{DeidError, Deidentified, Deidentifier, Subject};

/// What a destination sees (see the crate docs). Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Destination {
    name: String,
    profile: Profile,
    key: DestinationKey,
    map: Arc<ReidMap>,
    send_burned_in: bool,
}

/// An object ready for the destination once its pseudonyms are recorded
/// ([`Destination::record`]).
#[derive(Debug)]
pub struct Applied {
    /// The de-identified Part 10 object (its file meta names its pseudonymous SOP
    /// Instance UID).
    pub bytes: Vec<u8>,
    subject: Subject,
    done: Deidentified,
}

impl Destination {
    pub fn new(
        name: String,
        profile: Profile,
        key: DestinationKey,
        map: Arc<ReidMap>,
        send_burned_in: bool,
    ) -> Self {
        Self {
            name,
            profile,
            key,
            map,
            send_burned_in,
        }
    }

    /// The destination's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// De-identifies one stored object. Its pseudonyms must be recorded
    /// ([`Destination::record`]) before it is sent.
    pub fn apply(&self, part10: &[u8]) -> Result<Applied, DeidError> {
        let subject = Subject::scan(part10)?;
        let (bytes, done) = Deidentifier::new(
            self.profile.clone(),
            self.key.clone(),
            subject.clone(),
            self.send_burned_in,
        )
        .rewrite_all(part10)?;
        Ok(Applied {
            bytes,
            subject,
            done,
        })
    }

    /// Moves the rewritten object out (what is left still records its pseudonyms).
    pub fn take_bytes(applied: &mut Applied) -> Vec<u8> {
        std::mem::take(&mut applied.bytes)
    }

    /// Records the pseudonyms of objects about to be sent (one durable write for all that
    /// are new), so nothing is sent that the box could not re-identify. Blocks on the
    /// disk: call it on a blocking thread.
    pub fn record<'a>(
        &self,
        objects: impl IntoIterator<Item = &'a Applied>,
    ) -> Result<(), MapError> {
        self.map.record_all(
            &self.name,
            objects.into_iter().map(|a| (&a.subject, &a.done)),
        )
    }
}
