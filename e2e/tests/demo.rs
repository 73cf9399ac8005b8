//! The README's main job stays true: the demo runs to its summary and
//! exits 0 only when every number is what its batch must produce.

use std::process::Command;

#[test]
fn the_demo_runs_end_to_end_and_its_numbers_add_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "webhooks accepted          38",
        "duplicates absorbed         1",
        "instances completed        19  of 19 (failed 0, rejected 0)",
        "invoices in the ERP        19  net 8945.55 EUR",
        "self-approval refused",
        "audit verify             intact",
        "all as expected",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
