//! The per-group HMAC key that authenticates heartbeats.

use std::fmt;

use base64::Engine;
use hapair_crds::nodeapi::HeartbeatKey;

/// Shorter keys make forging a heartbeat a brute-force exercise; refuse them.
pub const MIN_KEY_LEN: usize = 16;

/// Key material for HMAC-SHA256. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct HmacKey(Vec<u8>);

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HmacKey(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a heartbeat key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("heartbeat key (inline): not valid base64: {0}")]
    NotBase64(String),
    #[error("heartbeat key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("heartbeat key ({origin}) is {len} bytes; at least {MIN_KEY_LEN} bytes are required")]
    TooShort { origin: String, len: usize },
}

impl HmacKey {
    /// Accepts raw key bytes of at least [`MIN_KEY_LEN`] bytes; `origin` names them in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { origin: origin.to_string(), len: bytes.len() });
        }
        Ok(HmacKey(bytes))
    }

    /// Loads the key a group's desired config points at: inline base64 or a file of raw bytes.
    pub fn load(source: &HeartbeatKey) -> Result<Self, KeyError> {
        match source {
            HeartbeatKey::Inline(text) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| KeyError::NotBase64(e.to_string()))?;
                HmacKey::from_bytes(bytes, "inline")
            }
            HeartbeatKey::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
                HmacKey::from_bytes(bytes, &format!("file {path}"))
            }
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_keys_are_base64_and_long_enough() {
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(HmacKey::load(&HeartbeatKey::Inline(good)).is_ok());
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 15]);
        let err = HmacKey::load(&HeartbeatKey::Inline(short)).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "heartbeat key (inline) is 15 bytes; at least 16 bytes are required");
        assert!(matches!(HmacKey::load(&HeartbeatKey::Inline("%%%".into())), Err(KeyError::NotBase64(_))));
    }

    #[test]
    fn file_keys_are_raw_bytes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("k");
        std::fs::write(&path, [1u8; 20]).unwrap_or_else(|e| panic!("{e}"));
        let key = HmacKey::load(&HeartbeatKey::File(path.display().to_string())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.bytes(), &[1u8; 20]);
        assert!(!format!("{key:?}").contains('1'));
        let missing = dir.path().join("missing").display().to_string();
        let err = HmacKey::load(&HeartbeatKey::File(missing.clone())).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with(&format!("heartbeat key file {missing}: ")), "{err}");
    }
}
