//! Action paths: `"/orders/{orderId}?expand={what}"` compiled once into
//! literal pieces and placeholders, filled per call with percent-encoded
//! values.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters is encoded, so a value can
/// never add a path segment, a query parameter or a fragment.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Literal(String),
    /// A placeholder; `in_path` is false once the query string has begun.
    Param {
        name: String,
        in_path: bool,
    },
}

/// A compiled action path.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PathTemplate {
    pieces: Vec<Piece>,
}

impl PathTemplate {
    pub(crate) fn compile(path: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = path;
        let mut in_path = true;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("unmatched '}}' in path {path:?}"));
                }
                Some(i) => {
                    let literal = &rest[..i];
                    in_path &= !literal.contains(['?', '#']);
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(literal.to_string()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find('}')
                        .ok_or_else(|| format!("unclosed '{{' in path {path:?}"))?;
                    let name = &after[..end];
                    if name.is_empty() || name.contains('{') {
                        return Err(format!("invalid placeholder in path {path:?}"));
                    }
                    pieces.push(Piece::Param {
                        name: name.to_string(),
                        in_path,
                    });
                    rest = &after[end + 1..];
                }
                None => {
                    pieces.push(Piece::Literal(rest.to_string()));
                    rest = "";
                }
            }
        }
        Ok(Self { pieces })
    }

    /// The path with every placeholder filled. Parameters the path does not
    /// name are ignored.
    pub(crate) fn render(
        &self,
        base: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(base.len() + 64);
        out.push_str(base);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param { name, in_path } => {
                    let value = params
                        .get(name)
                        .ok_or_else(|| format!("missing param {name:?}"))?;
                    // An empty value or a dot segment would address another
                    // resource ("/orders/" lists them all; servers collapse
                    // "/orders/../admin"), however it is encoded.
                    if *in_path && matches!(value.as_str(), "" | "." | "..") {
                        return Err(format!(
                            "param {name:?} must not be empty, \".\" or \"..\" in a path"
                        ));
                    }
                    out.extend(utf8_percent_encode(value, VALUE));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fills_and_encodes_placeholders() {
        let t = PathTemplate::compile("/orders/{orderId}/lines?sku={sku}&x=1").unwrap();
        let url = t
            .render(
                "https://erp.example.com/api",
                &params(&[("orderId", "A/B 1ü"), ("sku", "x&y=z#")]),
            )
            .unwrap();
        assert_eq!(
            url,
            "https://erp.example.com/api/orders/A%2FB%201%C3%BC/lines?sku=x%26y%3Dz%23&x=1"
        );
    }

    #[test]
    fn a_path_without_placeholders_is_one_literal() {
        let t = PathTemplate::compile("/invoices").unwrap();
        assert_eq!(
            t.render("http://h", &params(&[("a", "b")])).unwrap(),
            "http://h/invoices"
        );
    }

    #[test]
    fn refuses_missing_params_and_dot_segments_in_the_path_only() {
        let t = PathTemplate::compile("/orders/{id}?ref={ref}").unwrap();
        assert!(
            t.render("", &params(&[("ref", "r")]))
                .unwrap_err()
                .contains("missing param")
        );
        for bad in ["", ".", ".."] {
            assert!(t.render("", &params(&[("id", bad), ("ref", "r")])).is_err());
        }
        assert_eq!(
            t.render("", &params(&[("id", "7"), ("ref", "")])).unwrap(),
            "/orders/7?ref="
        );
    }

    #[test]
    fn refuses_malformed_templates() {
        for bad in ["/a/{id", "/a/id}", "/a/{}", "/a/{{id}}"] {
            assert!(PathTemplate::compile(bad).is_err(), "{bad}");
        }
    }
}
