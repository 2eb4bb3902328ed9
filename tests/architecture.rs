//! The module graph under `src/` stays acyclic (docs/architecture.md draws it):
//! `scripts/check-module-cycles.py` passes on the tree and fails on a cycle.

use std::path::Path;
use std::process::Command;

fn check(src: &Path) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-module-cycles.py");
    Command::new("python3")
        .arg(script)
        .arg(src)
        .output()
        .expect("python3 runs the module-cycle check")
}

#[test]
fn modules_under_src_import_each_other_without_cycles() {
    let out = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "module cycle under src/:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no cycle"), "{stdout}");
    // The leaves the architecture relies on: TLS and the wire codec depend on
    // nothing else in the crate.
    let leaves = stdout
        .lines()
        .find(|l| l.starts_with("layer 0:"))
        .expect("the check prints its layers");
    for leaf in ["tls", "pgwire", "allowlist", "shutdown"] {
        assert!(
            leaves.split_whitespace().any(|m| m == leaf),
            "{leaf} is not a leaf: {leaves}"
        );
    }
}

#[test]
fn check_fails_on_a_module_cycle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").expect("lib.rs");
    std::fs::write(
        src.join("a.rs"),
        "use crate::{b::Thing, c};\n// crate::nothing in a comment\n",
    )
    .expect("a.rs");
    std::fs::create_dir(src.join("b")).expect("b/");
    std::fs::write(src.join("b/mod.rs"), "pub struct Thing;\n").expect("b/mod.rs");
    std::fs::write(
        src.join("b/deep.rs"),
        "fn f() { let _ = crate::a::X; let _ = \"crate::c\"; }\n",
    )
    .expect("b/deep.rs");
    std::fs::write(src.join("c.rs"), "").expect("c.rs");
    let out = check(src);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("module cycle: a -> {b}, b -> {a}"),
        "{stdout}"
    );
}
