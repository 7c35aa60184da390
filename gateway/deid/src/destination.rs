//! One de-identifying destination: its profile, pseudonym key and the shared
//! re-identification map, applied to one stored object as it leaves.

use std::sync::Arc;

use crate::map::{MapError, ReidMap};
use crate::profile::Profile;
use crate::pseudonym::DestinationKey;
use crate::stream::{DeidError, Deidentifier, Subject};

/// Bytes fed to the rewriter at a time.
const CHUNK: usize = 256 * 1024;

/// What a destination sees (see the crate docs). Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Destination {
    name: String,
    profile: Profile,
    key: DestinationKey,
    map: Arc<ReidMap>,
    send_burned_in: bool,
}

/// An object ready for the destination.
#[derive(Debug)]
pub struct Applied {
    /// The de-identified Part 10 object (its file meta names its pseudonymous SOP
    /// Instance UID).
    pub bytes: Vec<u8>,
}

/// Why an object cannot go to the destination.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The object is held or cannot be de-identified: a dead letter with this reason.
    #[error(transparent)]
    Deid(#[from] DeidError),
    /// The pseudonyms could not be recorded: nothing may be sent.
    #[error(transparent)]
    Map(#[from] MapError),
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

    /// De-identifies one stored object and records its pseudonyms in the map (durable
    /// before it returns, so nothing is sent that the box could not re-identify). Blocks
    /// on the disk: call it on a blocking thread.
    pub fn apply(&self, part10: &[u8]) -> Result<Applied, ApplyError> {
        let subject = Subject::scan(part10)?;
        let mut rewriter = Deidentifier::new(
            self.profile.clone(),
            self.key.clone(),
            subject.clone(),
            self.send_burned_in,
        );
        let mut bytes = Vec::with_capacity(part10.len().saturating_add(1024));
        for chunk in part10.chunks(CHUNK) {
            rewriter.feed(chunk, &mut bytes)?;
        }
        let done = rewriter.finish(&mut bytes)?;
        self.map.record(&self.name, &subject, &done)?;
        Ok(Applied { bytes })
    }
}
