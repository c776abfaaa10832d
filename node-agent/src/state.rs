//! Where the agent keeps the last desired state it applied, so it survives control-plane
//! outages and its own restarts (ARCHITECTURE.md invariant 3).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use steward_proto::agent::v1::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub trait StateStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Option<DesiredState>, StateError>;
    fn save(&self, state: &DesiredState) -> Result<(), StateError>;
}

/// `desired-state.json` in the agent's data directory, replaced atomically.
#[derive(Debug)]
pub struct FileStateStore {
    path: PathBuf,
}

impl FileStateStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("desired-state.json"),
        }
    }
}

impl StateStore for FileStateStore {
    fn load(&self) -> Result<Option<DesiredState>, StateError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StateError::Corrupt {
                        path: self.path.clone(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&self, state: &DesiredState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        write_atomically(&self.path, &bytes, 0o644).map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// In memory, for simulated agents.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    state: Mutex<Option<DesiredState>>,
}

impl StateStore for MemoryStateStore {
    fn load(&self) -> Result<Option<DesiredState>, StateError> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn save(&self, state: &DesiredState) -> Result<(), StateError> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        Ok(())
    }
}

/// Writes to a temporary file, fsyncs it, renames it over `path`, and fsyncs the directory,
/// so a crash leaves either the old or the new content, never a torn file.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    let _ = mode;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_survives_a_restart_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let state = DesiredState {
            generation: 7,
            drain: true,
            models: vec![],
            ..Default::default()
        };
        FileStateStore::new(dir.path()).save(&state).unwrap();
        let reopened = FileStateStore::new(dir.path());
        assert_eq!(reopened.load().unwrap(), Some(state));
    }

    #[test]
    fn a_missing_file_is_no_state_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStateStore::new(dir.path());
        assert_eq!(store.load().unwrap(), None);
        std::fs::write(dir.path().join("desired-state.json"), b"{not json").unwrap();
        let err = store.load().unwrap_err();
        assert!(
            err.to_string().contains("desired-state.json is corrupt"),
            "{err}"
        );
    }
}
