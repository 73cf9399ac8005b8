//! Manifests as platform engineers write them: files of multi-document YAML,
//! found by walking directories.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One YAML document of a manifest file.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub index: usize,
    /// 1-based line the document starts on.
    pub line: usize,
    pub value: serde_json::Value,
}

/// A document that is not valid YAML.
#[derive(Clone, Debug)]
pub struct ParseError {
    pub file: PathBuf,
    pub index: usize,
    pub line: usize,
    pub message: String,
}

/// A path that could not be read.
#[derive(Clone, Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub message: String,
}

/// Everything found under a set of paths.
#[derive(Debug, Default)]
pub struct Loaded {
    pub documents: Vec<Document>,
    pub parse_errors: Vec<ParseError>,
    pub read_errors: Vec<ReadError>,
}

/// Extensions read when walking a directory. Files named explicitly are read
/// whatever their extension.
const MANIFEST_EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// Read every manifest file under `paths` (files, or directories walked
/// recursively in name order).
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        let mut files = Vec::new();
        match collect(path, true, &mut files) {
            Ok(()) => {}
            Err(e) => loaded.read_errors.push(ReadError {
                path: path.clone(),
                message: e.to_string(),
            }),
        }
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_into(&file, &text, &mut loaded),
                Err(e) => loaded.read_errors.push(ReadError {
                    path: file,
                    message: e.to_string(),
                }),
            }
        }
    }
    loaded
}

fn collect(path: &Path, explicit: bool, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        let mut entries = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort();
        for entry in entries {
            let hidden = entry
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !hidden {
                collect(&entry, false, files)?;
            }
        }
    } else if explicit
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e))
    {
        files.push(path.to_path_buf());
    }
    Ok(())
}

/// Parse the documents of one file's text.
pub fn parse_into(file: &Path, text: &str, loaded: &mut Loaded) {
    let starts = document_start_lines(text);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let line = starts.get(i).copied().unwrap_or(1);
        match Strict::deserialize(doc).map(|s| s.0) {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => loaded.documents.push(Document {
                file: file.to_path_buf(),
                index,
                line,
                value,
            }),
            Err(e) => {
                let line = e.location().map(|l| l.line()).unwrap_or(line);
                loaded.parse_errors.push(ParseError {
                    file: file.to_path_buf(),
                    index,
                    line,
                    message: format!("malformed YAML: {e}"),
                });
                // After a syntax error the parser cannot find the next document.
                break;
            }
        }
    }
}

/// A JSON value read from YAML that refuses a key given twice in one
/// mapping, as `kubectl` does: YAML parsers otherwise keep the last one
/// silently.
struct Strict(serde_json::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut out = serde_json::Map::new();
        while let Some(Strict(key)) = map.next_key()? {
            let key = match key {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(A::Error::custom(format!(
                        "a mapping key must be a scalar, got {other}"
                    )));
                }
            };
            let Strict(value) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "duplicate key {key:?} in one mapping"
                )));
            }
            out.insert(key, value);
        }
        Ok(out.into())
    }
}

/// The line each document begins on: its first line of content, or the line
/// after the `---` that opens it.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    let mut first_has_content = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line == "---" || line.starts_with("--- ") {
            if starts.len() == 1 && !first_has_content {
                starts[0] = n + 2;
            } else {
                starts.push(n + 2);
            }
        } else if starts.len() == 1
            && !first_has_content
            && !line.is_empty()
            && !line.starts_with('#')
        {
            starts[0] = n + 1;
            first_has_content = true;
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_their_index_and_line() {
        let text = "# c\na: 1\n---\nb: 2\n---\n\n---\nc: 3\n";
        let mut loaded = Loaded::default();
        parse_into(Path::new("x.yaml"), text, &mut loaded);
        let found: Vec<_> = loaded
            .documents
            .iter()
            .map(|d| (d.index, d.line, d.value.clone()))
            .collect();
        assert_eq!(found[0], (1, 2, serde_json::json!({"a": 1})));
        assert_eq!(found[1], (2, 4, serde_json::json!({"b": 2})));
        assert_eq!(found[2], (4, 8, serde_json::json!({"c": 3})));
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        let text = "metadata:\n  name: a\n  name: b\n";
        let mut loaded = Loaded::default();
        parse_into(Path::new("x.yaml"), text, &mut loaded);
        assert!(loaded.documents.is_empty());
        let err = &loaded.parse_errors[0];
        assert!(err.message.contains("duplicate key \"name\""), "{err:?}");
    }

    #[test]
    fn malformed_yaml_names_its_line() {
        let text = "a: 1\n---\nb: [1, 2\nc: 3\n";
        let mut loaded = Loaded::default();
        parse_into(Path::new("x.yaml"), text, &mut loaded);
        assert_eq!(loaded.documents.len(), 1);
        let err = &loaded.parse_errors[0];
        assert_eq!(err.index, 2);
        assert!(err.line >= 3, "{err:?}");
        assert!(err.message.contains("malformed YAML"));
    }
}
