//! Man pages and shell completions, generated from the binaries' own clap definitions so they
//! cannot drift from the real options.
//!
//! `ipaccessd --generate-docs DIR` and `ipaccessctl --generate-docs DIR` (hidden; `cargo xtask
//! package` runs them) write, laid out the way the Debian package installs them:
//!
//! - `DIR/man/<name>.8`, and for ipaccessctl one page per subcommand
//!   (`ipaccessctl-override-grant.8`);
//! - `DIR/completions/bash/<name>`, `DIR/completions/zsh/_<name>`,
//!   `DIR/completions/fish/<name>.fish`.

use std::{
    ffi::OsString,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use clap::Command;
use clap_complete::Shell;

/// The hidden option. It is looked for before clap parses, so it shows up in no help text,
/// man page or completion, and ipaccessctl's required subcommand does not get in its way.
pub const OPTION: &str = "--generate-docs";

/// Man page section: both programs are system administration tools.
const SECTION: &str = "8";

/// If the program was started as `PROGRAM --generate-docs DIR`, writes the docs of `command`
/// (named `name`) into DIR and returns the exit status to end with; otherwise `None`.
pub fn generate_if_requested(command: impl FnOnce() -> Command, name: &'static str) -> Option<i32> {
    let dir = match requested_dir(std::env::args_os()) {
        None => return None,
        Some(Ok(dir)) => dir,
        Some(Err(message)) => {
            eprintln!("error: {message}");
            return Some(2);
        }
    };
    Some(match generate(command(), name, &dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: writing the docs of {name} into {}: {e}", dir.display());
            1
        }
    })
}

/// `Some` when the first argument is [`OPTION`]: the directory after it, or why it is wrong.
fn requested_dir(args: impl IntoIterator<Item = OsString>) -> Option<Result<PathBuf, String>> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != OPTION {
        return None;
    }
    Some(match (args.next(), args.next()) {
        (Some(dir), None) => Ok(PathBuf::from(dir)),
        _ => Err(format!("usage: {OPTION} DIR")),
    })
}

/// Writes every man page and completion script of `command` under `dir`.
pub fn generate(command: Command, name: &'static str, dir: &Path) -> io::Result<()> {
    // Building propagates global options and gives each subcommand its display name
    // (`ipaccessctl-account-add`), which becomes its page's name.
    let mut command = command.name(name).bin_name(name).disable_help_subcommand(true);
    command.build();
    let man = dir.join("man");
    fs::create_dir_all(&man)?;
    write_man_pages(&command, &man)?;
    for (shell, file) in [
        (Shell::Bash, format!("bash/{name}")),
        (Shell::Zsh, format!("zsh/_{name}")),
        (Shell::Fish, format!("fish/{name}.fish")),
    ] {
        let path = dir.join("completions").join(file);
        fs::create_dir_all(path.parent().expect("a file under completions/"))?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, name, &mut script);
        fs::write(path, script)?;
    }
    Ok(())
}

/// The page of `command` and, recursively, of each of its visible subcommands.
fn write_man_pages(command: &Command, dir: &Path) -> io::Result<()> {
    let page_name = command.get_display_name().unwrap_or(command.get_name()).to_string();
    let source = format!("ipaccess {}", env!("CARGO_PKG_VERSION"));
    let man = clap_mangen::Man::new(command.clone())
        .title(page_name.to_uppercase())
        .section(SECTION)
        .source(source)
        .manual("ipaccess");
    let mut page = fs::File::create(dir.join(format!("{page_name}.{SECTION}")))?;
    man.render(&mut page)?;
    page.flush()?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_a_leading_option_asks_for_docs() {
        assert_eq!(requested_dir(args(&["ipaccessctl", "status"])), None);
        assert_eq!(requested_dir(args(&["ipaccessctl"])), None);
        assert_eq!(requested_dir(args(&["ipaccessctl", "status", OPTION, "d"])), None);
        assert_eq!(requested_dir(args(&["ipaccessctl", OPTION, "d"])), Some(Ok(PathBuf::from("d"))));
        assert!(matches!(requested_dir(args(&["ipaccessctl", OPTION])), Some(Err(_))));
        assert!(matches!(requested_dir(args(&["ipaccessctl", OPTION, "d", "e"])), Some(Err(_))));
    }
}
