//! The results state files: one sealed JSON document per role, replaced whole and durably
//! (`gateway_booking::SealKey`: AES-256-GCM under a key derived from the master key, the
//! role as additional data; atomic write with fsync). They name appointments, accession
//! numbers and study UIDs, so they are never in clear. Blocking: callers use a blocking
//! thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_booking::SealKey;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ResultsError;

/// One sealed state file.
#[derive(Debug, Clone)]
pub(crate) struct StateFile {
    seal: Arc<SealKey>,
    path: PathBuf,
    role: &'static str,
}

impl StateFile {
    /// The file `name` in `dir` (created 0700 if needed), sealed for `role`.
    pub(crate) fn new(
        seal: Arc<SealKey>,
        dir: &Path,
        name: &str,
        role: &'static str,
    ) -> Result<Self, ResultsError> {
        gateway_durable::ensure_private_dir(dir).map_err(|e| ResultsError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            seal,
            path: dir.join(name),
            role,
        })
    }

    /// The stored state, or the default when there is none yet.
    pub(crate) fn load<T: DeserializeOwned + Default>(&self) -> Result<T, ResultsError> {
        match self.seal.read(&self.path, self.role)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|_| ResultsError::Corrupt {
                path: self.path.clone(),
            }),
            None => Ok(T::default()),
        }
    }

    /// Replaces the stored state with `value` (durable when it returns).
    pub(crate) fn save<T: Serialize>(&self, value: &T) -> Result<(), ResultsError> {
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(value).map_err(|_| {
            ResultsError::Corrupt {
                path: self.path.clone(),
            }
        })?);
        Ok(self.seal.write(&self.path, self.role, &bytes)?)
    }
}
