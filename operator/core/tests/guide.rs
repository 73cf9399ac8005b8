//! The user guide (`docs/guide/*.md`) is kept in step with the examples.
//!
//! - Every fenced `yaml` block is preceded (blank lines aside) by an HTML
//!   comment `<!-- from: examples/<scenario>/<file>.yaml -->`, and its lines
//!   occur in that file as one contiguous run. Leading indentation common to
//!   the block is ignored on both sides, so a block may be an excerpt
//!   re-indented as a whole; trailing spaces are ignored. A made-up manifest
//!   cannot pass: the guide shows what the examples run.
//! - Every relative Markdown link points to a file or directory that exists.
//!
//! A failure names the guide file, the block number (1-based, counting the
//! file's `yaml` blocks) and the first line of the block not found in the
//! example, or the link that leads nowhere.

use std::path::{Path, PathBuf};

/// The chapters the guide must have.
const CHAPTERS: &[&str] = &[
    "README.md",
    "concepts.md",
    "workflows.md",
    "connectors.md",
    "policies.md",
    "cel-cookbook.md",
    "security.md",
    "runbook.md",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guide_files() -> Vec<PathBuf> {
    let dir = repo().join("docs/guide");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

/// A fenced code block: its language, the line of its opening fence
/// (1-based), its lines, and the last non-blank line before the fence.
struct Block {
    lang: String,
    line: usize,
    lines: Vec<String>,
    before: Option<String>,
}

/// The fenced code blocks of a Markdown text, and the text outside them.
fn blocks(text: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut out = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<(String, Block)> = None;
    let mut last_non_blank: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match &mut open {
            Some((fence, block)) => {
                if t.starts_with(fence.as_str()) && t[fence.len()..].trim().is_empty() {
                    let (_, block) = open.take().expect("an open block");
                    out.push(block);
                    last_non_blank = None;
                } else {
                    block.lines.push(line.to_string());
                }
            }
            None => {
                let fence: String = t.chars().take_while(|&c| c == '`' || c == '~').collect();
                let uniform = fence
                    .chars()
                    .all(|c| c == fence.chars().next().unwrap_or('`'));
                if fence.len() >= 3 && uniform {
                    let lang = t[fence.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_lowercase();
                    open = Some((
                        fence,
                        Block {
                            lang,
                            line: i + 1,
                            lines: Vec::new(),
                            before: last_non_blank.clone(),
                        },
                    ));
                } else {
                    if !t.is_empty() {
                        last_non_blank = Some(t.to_string());
                    }
                    prose.push((i + 1, line.to_string()));
                }
            }
        }
    }
    if let Some((_, block)) = open {
        out.push(block);
    }
    (out, prose)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Lines without trailing spaces and without the indentation common to
/// every non-blank line.
fn dedent(lines: &[String]) -> Vec<String> {
    let lines: Vec<&str> = lines.iter().map(|l| l.trim_end()).collect();
    let common = lines
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| indent(l))
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                l[common..].to_string()
            }
        })
        .collect()
}

/// Whether `snippet` occurs in `file` as a contiguous run of lines,
/// re-indented as a whole. `Err(i)`: the index of the first snippet line
/// not found, taking the start that matches the longest prefix.
fn find_excerpt(snippet: &[String], file: &str) -> Result<(), usize> {
    let mut snippet = dedent(snippet);
    while snippet.last().is_some_and(|l| l.is_empty()) {
        snippet.pop();
    }
    while snippet.first().is_some_and(|l| l.is_empty()) {
        snippet.remove(0);
    }
    if snippet.is_empty() {
        return Err(0);
    }
    let file: Vec<&str> = file.lines().map(|l| l.trim_end()).collect();
    let mut best = 0;
    for start in 0..file.len() {
        // The indentation of the run relative to the snippet, fixed by the
        // snippet's first line (which is non-blank after trimming).
        let first = file[start];
        if first.is_empty() || indent(first) < indent(&snippet[0]) {
            continue;
        }
        let shift = indent(first) - indent(&snippet[0]);
        let pad = " ".repeat(shift);
        let matched = snippet
            .iter()
            .zip(&file[start..])
            .take_while(|(s, f)| {
                if s.is_empty() {
                    f.is_empty()
                } else {
                    f.strip_prefix(pad.as_str()) == Some(s.as_str())
                }
            })
            .count();
        if matched == snippet.len() {
            return Ok(());
        }
        best = best.max(matched);
    }
    Err(best)
}

fn source_of(comment: &str) -> Option<&str> {
    comment
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("from:")
        .map(str::trim)
}

/// Problems with the `yaml` blocks of one guide file.
fn check_excerpts(name: &str, text: &str, root: &Path) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut count = 0;
    let (blocks, _) = blocks(text);
    for block in blocks
        .iter()
        .filter(|b| b.lang == "yaml" || b.lang == "yml")
    {
        count += 1;
        let at = format!("{name}: yaml block {count} (line {})", block.line);
        let Some(source) = block.before.as_deref().and_then(source_of) else {
            problems.push(format!(
                "{at}: not preceded by <!-- from: examples/<scenario>/<file>.yaml -->"
            ));
            continue;
        };
        if !source.starts_with("examples/") {
            problems.push(format!(
                "{at}: the source {source:?} is not under examples/"
            ));
            continue;
        }
        let path = root.join(source);
        let Ok(example) = std::fs::read_to_string(&path) else {
            problems.push(format!("{at}: {source} does not exist"));
            continue;
        };
        let mut lines: Vec<String> = block.lines.clone();
        let leading = lines.iter().take_while(|l| l.trim().is_empty()).count();
        lines.drain(..leading);
        if let Err(i) = find_excerpt(&lines, &example) {
            let missing = lines.get(i).map(|l| l.trim_end()).unwrap_or("");
            problems.push(format!(
                "{at}: line {} of the block is not in {source} after the lines before it: {missing:?}",
                i + 1 + leading
            ));
        }
    }
    (count, problems)
}

/// The targets of the Markdown links on one line of prose, inline code
/// spans left out.
fn link_targets(line: &str) -> Vec<String> {
    let mut text = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            text.push_str(part);
        }
    }
    let mut targets = Vec::new();
    let trimmed = text.trim_start();
    // Reference definitions: `[label]: target`.
    if trimmed.starts_with('[')
        && let Some(close) = trimmed.find("]:")
    {
        if let Some(t) = trimmed[close + 2..].split_whitespace().next() {
            targets.push(t.to_string());
        }
        return targets;
    }
    let mut rest = text.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.trim_matches(['<', '>']).to_string());
        rest = &after[end..];
    }
    targets
}

fn is_relative(target: &str) -> bool {
    !(target.is_empty()
        || target.starts_with('#')
        || target.contains("://")
        || target.starts_with("mailto:"))
}

fn check_links(name: &str, text: &str, dir: &Path) -> Vec<String> {
    let (_, prose) = blocks(text);
    let mut problems = Vec::new();
    for (line, content) in prose {
        for target in link_targets(&content) {
            if !is_relative(&target) {
                continue;
            }
            let file = target.split(['#', '?']).next().unwrap_or("");
            if file.is_empty() {
                continue;
            }
            if !dir.join(file).exists() {
                problems.push(format!(
                    "{name}:{line}: link to {target:?}, but {} does not exist",
                    dir.join(file).display()
                ));
            }
        }
    }
    problems
}

#[test]
fn the_guide_has_its_chapters() {
    let dir = repo().join("docs/guide");
    let missing: Vec<&&str> = CHAPTERS.iter().filter(|c| !dir.join(c).is_file()).collect();
    assert!(missing.is_empty(), "docs/guide lacks {missing:?}");
}

#[test]
fn the_guides_snippets_are_excerpts_of_the_examples() {
    let root = repo();
    let mut problems = Vec::new();
    let mut total = 0;
    for file in guide_files() {
        let name = format!(
            "docs/guide/{}",
            file.file_name().unwrap_or_default().to_string_lossy()
        );
        let text = std::fs::read_to_string(&file).expect("guide file readable");
        let (count, found) = check_excerpts(&name, &text, &root);
        total += count;
        problems.extend(found);
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    assert!(
        total >= 10,
        "only {total} yaml excerpts in the guide; it should show the examples"
    );
}

#[test]
fn the_guides_relative_links_lead_somewhere() {
    let dir = repo().join("docs/guide");
    let mut problems = Vec::new();
    for file in guide_files() {
        let name = format!(
            "docs/guide/{}",
            file.file_name().unwrap_or_default().to_string_lossy()
        );
        let text = std::fs::read_to_string(&file).expect("guide file readable");
        problems.extend(check_links(&name, &text, &dir));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

// The checker itself.

const EXAMPLE: &str = "\
kind: Workflow
spec:
  steps:
    - name: order
      call:
        connector: erp

    - name: done
      emit: {type: invoice.created}
";

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

#[test]
fn an_excerpt_may_be_reindented_as_a_whole() {
    assert_eq!(
        find_excerpt(&lines("- name: order\n  call:"), EXAMPLE),
        Ok(())
    );
    assert_eq!(
        find_excerpt(
            &lines(
                "        - name: order\n          call:\n            connector: erp\n\n        - name: done"
            ),
            EXAMPLE
        ),
        Ok(())
    );
    assert_eq!(
        find_excerpt(&lines("kind: Workflow\nspec:"), EXAMPLE),
        Ok(())
    );
}

#[test]
fn a_changed_or_invented_line_is_reported() {
    // The third line differs from the example.
    assert_eq!(
        find_excerpt(
            &lines("- name: order\n  call:\n    connector: erp-ledger"),
            EXAMPLE
        ),
        Err(2)
    );
    // Relative indentation is part of the content.
    assert_eq!(
        find_excerpt(&lines("- name: order\ncall:"), EXAMPLE),
        Err(1)
    );
    // Lines from two places are not one excerpt.
    assert_eq!(
        find_excerpt(&lines("kind: Workflow\n- name: done"), EXAMPLE),
        Err(1)
    );
    assert_eq!(find_excerpt(&lines("retry: {}"), EXAMPLE), Err(0));
}

#[test]
fn blocks_need_their_source_and_links_are_found() {
    let root = repo();
    let text = "Intro\n\n```yaml\nkind: Workflow\n```\n\n<!-- from: examples/nowhere/x.yaml -->\n```yaml\na: b\n```\n";
    let (count, problems) = check_excerpts("t.md", text, &root);
    assert_eq!(count, 2);
    assert!(
        problems[0].contains("yaml block 1") && problems[0].contains("not preceded"),
        "{problems:?}"
    );
    assert!(problems[1].contains("does not exist"), "{problems:?}");
    assert_eq!(
        link_targets("see [a](concepts.md#keys), [b](https://x.y) and `[c](no.md)`"),
        vec!["concepts.md#keys".to_string(), "https://x.y".to_string()]
    );
    assert_eq!(link_targets("[ref]: ../x.md"), vec!["../x.md".to_string()]);
}
