//! Render: a snapshot of entries → the bytes of every output, all in memory, before anything is written.
//!
//! Rendering is all-or-nothing: if any output fails to render (a template names a missing key, two keys
//! collide in a dotenv file), nothing is written, so the app never sees one output updated and another
//! stale.

mod formats;
mod names;
mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

pub use formats::dotenv_name;
pub use names::{object_key_reason, unsafe_reason};

use crate::config::{ConfigError, Outputs, ValueFormat};
use crate::hash::ContentHasher;
use crate::state::{NameMap, Snapshot};
use template::Templates;

/// Files for the one-file-per-key directory.
#[derive(Clone, PartialEq, Eq)]
pub struct DirPayload {
    pub path: PathBuf,
    pub files: DirFiles,
}

/// File name → bytes, in name order. The render is kept until the next sync (drift repair without a
/// server call): names in one buffer, contents in another, so that keeping it costs a few allocations,
/// not two per file among the sync's transient ones (see [`crate::state::NameSet`]).
pub type DirFiles = NameMap;

/// One single-file output (aggregate or template).
#[derive(Clone, PartialEq, Eq)]
pub struct FilePayload {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub in_place: bool,
    /// What produced it, for messages: `--output` or `--template <source>`.
    pub origin: String,
}

impl fmt::Debug for DirPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirPayload")
            .field("path", &self.path)
            .field("files", self.files.names())
            .finish()
    }
}

impl fmt::Debug for FilePayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilePayload")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .finish()
    }
}

/// A key left out of an output because its name does not fit there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedKey {
    pub key: String,
    /// `--output-dir` or `ConfigMap/Secret`.
    pub output: &'static str,
    pub reason: &'static str,
}

/// Data for `--configmap`/`--secret`: one entry per key, rendered like `--output-dir` files.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectPayload {
    pub data: BTreeMap<String, Vec<u8>>,
    /// Keyed hash (HMAC) of the data, stored in the objects' `osc-agent.io/content-hash` annotation.
    pub hash: String,
}

impl fmt::Debug for ObjectPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectPayload")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("hash", &self.hash)
            .finish()
    }
}

/// Everything to write for one snapshot.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub dir: Option<DirPayload>,
    pub objects: Option<ObjectPayload>,
    pub files: Vec<FilePayload>,
    pub rejected: Vec<RejectedKey>,
    /// Keyed hash (HMAC) over every output's name and bytes: equal hashes mean nothing to write or
    /// announce.
    pub hash: String,
}

/// Rendering failed; nothing was written. Messages name the output and key, never a value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// Renders snapshots into the configured outputs.
#[derive(Debug)]
pub struct Renderer {
    outputs: Outputs,
    objects: bool,
    templates: Templates,
    hasher: ContentHasher,
}

impl Renderer {
    /// `objects`: also render the ConfigMap/Secret payload; `hasher` keys every content hash.
    pub fn new(
        outputs: &Outputs,
        objects: bool,
        hasher: ContentHasher,
    ) -> Result<Renderer, ConfigError> {
        let sources: Vec<PathBuf> = outputs.templates.iter().map(|t| t.source.clone()).collect();
        Ok(Renderer {
            outputs: outputs.clone(),
            objects,
            templates: Templates::load(&sources)?,
            hasher,
        })
    }

    fn value_bytes(&self, key: &str, value: &serde_json::Value) -> Result<Vec<u8>, RenderError> {
        formats::value_file(value, self.outputs.value_format).map_err(|e| {
            RenderError(format!(
                "key '{}': cannot serialise: {e}",
                crate::util::Escaped(key)
            ))
        })
    }

    pub fn render(&self, snap: &Snapshot) -> Result<Rendered, RenderError> {
        let mut rejected = Vec::new();
        let dir = match &self.outputs.dir {
            None => None,
            Some(path) => {
                let mut files = DirFiles::default();
                for (key, entry) in &snap.entries {
                    if let Some(reason) = unsafe_reason(key) {
                        rejected.push(RejectedKey {
                            key: key.clone(),
                            output: "--output-dir",
                            reason,
                        });
                        continue;
                    }
                    let bytes = self.value_bytes(key, &entry.value)?;
                    // The entries are a map: their keys come in order, each once.
                    files.push(key, &bytes);
                }
                files.shrink_to_fit();
                Some(DirPayload {
                    path: path.clone(),
                    files,
                })
            }
        };

        let objects = if self.objects {
            let mut data = BTreeMap::new();
            for (key, entry) in &snap.entries {
                if let Some(reason) = object_key_reason(key) {
                    rejected.push(RejectedKey {
                        key: key.clone(),
                        output: "ConfigMap/Secret",
                        reason,
                    });
                    continue;
                }
                data.insert(key.clone(), self.value_bytes(key, &entry.value)?);
            }
            let hash = self
                .hasher
                .fields(data.iter().flat_map(|(k, v)| [k.as_bytes(), v.as_slice()]));
            Some(ObjectPayload { data, hash })
        } else {
            None
        };

        let mut files = Vec::new();
        for out in &self.outputs.files {
            let contents = formats::aggregate(&snap.entries, out.format).map_err(|e| {
                RenderError(format!(
                    "--output '{}': {e}",
                    crate::util::escape_path(&out.path)
                ))
            })?;
            files.push(FilePayload {
                path: out.path.clone(),
                contents,
                in_place: out.in_place,
                origin: "--output".to_owned(),
            });
        }
        for t in &self.outputs.templates {
            let contents = self
                .templates
                .render(&t.source, snap)
                .map_err(RenderError)?;
            files.push(FilePayload {
                path: t.destination.clone(),
                contents,
                in_place: t.in_place,
                origin: format!("--template '{}'", crate::util::escape_path(&t.source)),
            });
        }

        let hash = content_hash(
            &self.hasher,
            dir.as_ref(),
            objects.as_ref(),
            &files,
            self.outputs.value_format,
        );
        Ok(Rendered {
            dir,
            objects,
            files,
            rejected,
            hash,
        })
    }
}

fn content_hash(
    hasher: &ContentHasher,
    dir: Option<&DirPayload>,
    objects: Option<&ObjectPayload>,
    files: &[FilePayload],
    format: ValueFormat,
) -> String {
    let format = format!("{format:?}");
    let mut fields: Vec<&[u8]> = vec![format.as_bytes()];
    if let Some(d) = dir {
        fields.push(d.path.as_os_str().as_encoded_bytes());
        for (name, bytes) in d.files.iter() {
            fields.push(name.as_bytes());
            fields.push(bytes);
        }
    }
    if let Some(o) = objects {
        fields.push(o.hash.as_bytes());
    }
    for f in files {
        fields.push(f.path.as_os_str().as_encoded_bytes());
        fields.push(&f.contents);
    }
    hasher.fields(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileOptions, OutputFormat, OutputSpec};
    use crate::state::Entry;
    use serde_json::json;

    fn outputs() -> Outputs {
        Outputs {
            dir: Some("/out".into()),
            value_format: ValueFormat::Json,
            files: vec![OutputSpec {
                path: "/agg.json".into(),
                format: OutputFormat::Json,
                in_place: false,
            }],
            templates: vec![],
            file: FileOptions {
                mode: 0o600,
                uid: None,
                gid: None,
            },
        }
    }

    fn snap(pairs: &[(&str, serde_json::Value)]) -> Snapshot {
        Snapshot {
            environment: "prod".into(),
            entries: pairs
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Entry {
                            key: k.to_string(),
                            category: None,
                            value: v.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn unsafe_keys_are_left_out_of_the_directory_only() {
        let r = Renderer::new(&outputs(), false, ContentHasher::with_key([7; 32])).unwrap();
        let out = r
            .render(&snap(&[
                ("../x", json!("a")),
                ("ok", json!("b")),
                ("..data", json!("c")),
            ]))
            .unwrap();
        let dir = out.dir.unwrap();
        assert_eq!(dir.files.names().iter().collect::<Vec<_>>(), vec!["ok"]);
        assert_eq!(out.rejected.len(), 2);
        let agg: serde_json::Value = serde_json::from_slice(&out.files[0].contents).unwrap();
        assert_eq!(agg["../x"], json!("a"));
    }

    #[test]
    fn hash_changes_with_content_only() {
        let r = Renderer::new(&outputs(), false, ContentHasher::with_key([7; 32])).unwrap();
        let a = r.render(&snap(&[("k", json!("1"))])).unwrap().hash;
        let b = r.render(&snap(&[("k", json!("1"))])).unwrap().hash;
        let c = r.render(&snap(&[("k", json!("2"))])).unwrap().hash;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
