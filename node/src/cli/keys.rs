//! `drift keygen` and `drift id`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use drift_protocol::SecretKey;
use rand_core::OsRng;

use crate::durable::Overwrite;
use crate::identity::{read_key, write_key};

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (created with mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// A key file made by `drift keygen`.
    pub key: PathBuf,
}

pub(crate) fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let key = SecretKey::generate(&mut OsRng);
    let overwrite = if args.force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    write_key(&args.out, &key, overwrite).context("keygen")?;
    println!("{}", key.public());
    eprintln!("wrote {} (mode 0600)", args.out.display());
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn id(args: IdArgs) -> anyhow::Result<ExitCode> {
    let key = read_key(&args.key)?;
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}
