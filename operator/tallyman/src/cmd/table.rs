//! Plain-text tables for the terminal commands.

/// Left-aligned columns, `gap` spaces apart, no trailing spaces.
pub fn columns(rows: &[Vec<String>], gap: usize) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + gap));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
