//! `drift completions SHELL` and `drift man`: the command line described for shells and for
//! `man`, generated from the same definition the parser uses, so neither can drift from it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write `drift.1` and one `drift-COMMAND.1` page per subcommand into
    /// (created if missing); without it, `drift.1` goes to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Prints the completion script, e.g. `drift completions bash > /etc/bash_completion.d/drift`.
pub(super) fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "drift", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Writes the man pages.
pub(super) fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let cmd = super::Cli::command();
    match args.out {
        None => {
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let written = write_pages(&cmd, "drift", &dir)?;
            eprintln!("{written} man pages in {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `name.1` for `cmd` and, recursively, `name-SUB.1` for each visible subcommand.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<usize> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_string()))
        .render(&mut page)
        .with_context(|| format!("rendering {name}.1"))?;
    let path = dir.join(format!("{name}.1"));
    crate::durable::write_atomic(&path, &page, 0o644, crate::durable::Overwrite::Replace)
        .with_context(|| format!("writing {}", path.display()))?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}
