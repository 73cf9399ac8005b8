//! Where Secret values come from.
//!
//! In a cluster Secrets are mounted into the pod, one directory per Secret
//! and one file per key ([`MountedSecrets`]); dev mode and tests hand values
//! over directly ([`StaticSecrets`]). Values are never copied anywhere else,
//! and no error message ever contains one.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Where Secret values come from (Kubernetes-mounted files, dev-mode
/// manifests, tests).
pub trait SecretSource: Send + Sync {
    /// The value of `key` in the Secret `name`.
    fn get(&self, name: &str, key: &str) -> Result<Vec<u8>, SecretError>;
}

/// Why a Secret value could not be read. Names the Secret and key, never the
/// value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name:?} has no key {key:?}")]
    NotFound { name: String, key: String },
    #[error("failed to read key {key:?} of secret {name:?}")]
    Unreadable {
        name: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// Secrets mounted as files: `<root>/<secret name>/<key>`.
#[derive(Clone, Debug)]
pub struct MountedSecrets {
    root: PathBuf,
}

impl MountedSecrets {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl SecretSource for MountedSecrets {
    fn get(&self, name: &str, key: &str) -> Result<Vec<u8>, SecretError> {
        let not_found = || SecretError::NotFound {
            name: name.to_string(),
            key: key.to_string(),
        };
        // Secret names and keys never contain a slash or name a parent
        // directory; refusing them keeps a reference inside `root`.
        let unsafe_part =
            |s: &str| s.is_empty() || s == "." || s == ".." || s.contains(['/', '\\']);
        if unsafe_part(name) || unsafe_part(key) {
            return Err(not_found());
        }
        match std::fs::read(self.root.join(name).join(key)) {
            Ok(value) => Ok(value),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found()),
            Err(source) => Err(SecretError::Unreadable {
                name: name.to_string(),
                key: key.to_string(),
                source,
            }),
        }
    }
}

/// Secrets held in memory, for dev mode and tests.
#[derive(Clone, Default)]
pub struct StaticSecrets {
    values: BTreeMap<(String, String), Vec<u8>>,
}

impl StaticSecrets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one value.
    pub fn with(mut self, name: &str, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.insert(name, key, value);
        self
    }

    /// The values of `v1` Secret manifests in one namespace (`stringData` as
    /// it is, `data` base64-decoded), as dev mode reads them beside the
    /// Workflows. Other documents are skipped.
    pub fn from_manifests<'a>(
        documents: impl IntoIterator<Item = &'a serde_json::Value>,
        namespace: &str,
    ) -> Self {
        use base64::Engine;
        let mut secrets = Self::new();
        for doc in documents {
            if doc.get("kind").and_then(|k| k.as_str()) != Some("Secret") {
                continue;
            }
            let ns = doc
                .pointer("/metadata/namespace")
                .and_then(|n| n.as_str())
                .unwrap_or("default");
            let Some(name) = doc.pointer("/metadata/name").and_then(|n| n.as_str()) else {
                continue;
            };
            if ns != namespace {
                continue;
            }
            for (section, encoded) in [("data", true), ("stringData", false)] {
                let Some(map) = doc.get(section).and_then(|m| m.as_object()) else {
                    continue;
                };
                for (key, value) in map {
                    let Some(text) = value.as_str() else { continue };
                    let bytes = if encoded {
                        match base64::engine::general_purpose::STANDARD.decode(text) {
                            Ok(b) => b,
                            Err(_) => continue,
                        }
                    } else {
                        text.as_bytes().to_vec()
                    };
                    secrets.insert(name, key, bytes);
                }
            }
        }
        secrets
    }

    /// Adds (or replaces) one value.
    pub fn insert(&mut self, name: &str, key: &str, value: impl Into<Vec<u8>>) {
        self.values
            .insert((name.to_string(), key.to_string()), value.into());
    }
}

impl std::fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys only: values stay out of every log line.
        f.debug_list().entries(self.values.keys()).finish()
    }
}

#[cfg(test)]
mod manifest_tests {
    use super::*;

    #[test]
    fn secrets_come_from_string_data_and_base64_data() {
        let docs = [
            serde_json::json!({"kind": "Secret", "metadata": {"name": "erp", "namespace": "finance"},
                "stringData": {"token": "plain"}, "data": {"user": "YWxpY2U="}}),
            serde_json::json!({"kind": "Secret", "metadata": {"name": "other", "namespace": "elsewhere"},
                "stringData": {"token": "x"}}),
            serde_json::json!({"kind": "ConfigMap", "metadata": {"name": "erp"}}),
        ];
        let s = StaticSecrets::from_manifests(docs.iter(), "finance");
        assert_eq!(s.get("erp", "token").unwrap(), b"plain");
        assert_eq!(s.get("erp", "user").unwrap(), b"alice");
        assert!(s.get("other", "token").is_err());
    }
}

impl SecretSource for StaticSecrets {
    fn get(&self, name: &str, key: &str) -> Result<Vec<u8>, SecretError> {
        self.values
            .get(&(name.to_string(), key.to_string()))
            .cloned()
            .ok_or_else(|| SecretError::NotFound {
                name: name.to_string(),
                key: key.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_secrets_read_files_and_stay_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("tallyman-secrets-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("erp-token")).unwrap();
        std::fs::write(dir.join("erp-token").join("token"), b"t0k3n\n").unwrap();
        let secrets = MountedSecrets::new(&dir);

        assert_eq!(secrets.get("erp-token", "token").unwrap(), b"t0k3n\n");
        assert!(matches!(
            secrets.get("erp-token", "missing"),
            Err(SecretError::NotFound { .. })
        ));
        assert!(matches!(
            secrets.get("..", "etc"),
            Err(SecretError::NotFound { .. })
        ));
        assert!(matches!(
            secrets.get("erp-token", "../erp-token/token"),
            Err(SecretError::NotFound { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn static_secrets_never_debug_print_values() {
        let secrets = StaticSecrets::new().with("erp", "token", "s3cr3t");
        assert_eq!(secrets.get("erp", "token").unwrap(), b"s3cr3t");
        assert!(!format!("{secrets:?}").contains("s3cr3t"));
    }
}
