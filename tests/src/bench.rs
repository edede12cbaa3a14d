//! What the benchmark binaries share: their command line.

use std::collections::HashSet;

/// The switches given on the command line, each one of `known` (name and what it does).
/// `--help` prints them and exits; anything else unknown exits with status 2 before the
/// benchmark builds its namespaces, so a mistyped switch never starts a long run.
pub fn switches(program: &str, known: &[(&str, &str)]) -> HashSet<String> {
    let usage = || {
        let mut text = format!("usage: {program} [SWITCH]...\n");
        for (name, what) in known {
            text.push_str(&format!("  {name:<16}{what}\n"));
        }
        text
    };
    let mut given = HashSet::new();
    for arg in std::env::args().skip(1) {
        if arg == "--help" || arg == "-h" {
            print!("{}", usage());
            std::process::exit(0);
        }
        if !known.iter().any(|(name, _)| *name == arg) {
            eprint!("{program}: unknown argument {arg:?}\n{}", usage());
            std::process::exit(2);
        }
        given.insert(arg);
    }
    given
}
