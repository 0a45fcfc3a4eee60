//! A corpus of broken image configs (tests/bad/*.toml). Each file's first line says what the
//! one error must be: `# expect: LINE:COL: KEY: MESSAGE-PREFIX`. The test checks that the
//! error names exactly that place and key, so every bad input gets a located message.

use std::path::Path;

fn check(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.lines().next().unwrap_or_default();
    let want = first
        .strip_prefix("# expect: ")
        .ok_or_else(|| format!("{}: first line must be `# expect: ...`", path.display()))?;
    let mut parts = want.splitn(4, ':');
    let line: usize = parts.next().unwrap().trim().parse().unwrap();
    let col: usize = parts.next().unwrap().trim().parse().unwrap();
    let key = parts.next().unwrap().trim();
    let msg = parts.next().unwrap_or("").trim();
    let err = match clutch_config::parse_image_config(path, &text) {
        Ok(_) => {
            return Err(format!(
                "{}: parsed, but should fail with {want}",
                path.display()
            ));
        }
        Err(e) => e,
    };
    let d = err
        .diagnostic()
        .ok_or_else(|| format!("{}: unlocated error {err}", path.display()))?;
    let shown = err.to_string();
    let ok = d.line == line && d.col == col && d.key == key && d.message.contains(msg);
    if !ok {
        return Err(format!(
            "{}:\n  want {line}:{col}: {key}: {msg}…\n  got  {shown}",
            path.display()
        ));
    }
    // The printed form starts with file:line:col.
    assert!(
        shown.starts_with(&format!("{}:{line}:{col}: ", path.display())),
        "{shown}"
    );
    Ok(())
}

#[test]
fn every_bad_config_gets_one_located_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "the corpus shrank: {} files",
        files.len()
    );
    let failures: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} wrong:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_image_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-configs");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            clutch_config::load_image_config(&p).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn shipped_boards_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let b = clutch_config::load_board(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                Some(b.name.as_str()),
                p.file_stem().and_then(|s| s.to_str()),
                "board name = file name"
            );
        }
    }
}
