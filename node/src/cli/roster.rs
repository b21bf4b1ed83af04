//! `drift roster init | add | remove | sign | show | verify`.
//!
//! The admin edits a TOML draft, signs it into a roster file with the (offline) admin key, and
//! distributes the roster file to every node. The next epoch is signed from an edited draft with
//! `--prev` naming the roster it replaces, which links the two by hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use drift_protocol::codec::encode_frame;
use drift_protocol::roster::{self, Roster};
use drift_protocol::{NodeId, Signed, Timestamp};

use crate::clock::now;
use crate::durable::Overwrite;
use crate::identity::{
    read_draft, read_key, read_signed_roster, write_draft, write_signed_roster, DraftMember,
    RosterDraft,
};

#[derive(Debug, Subcommand)]
pub enum RosterCommand {
    /// Start a new roster draft (TOML).
    Init(InitArgs),
    /// Add a member to a draft.
    Add(AddArgs),
    /// Remove a member from a draft (by name or id).
    Remove(RemoveArgs),
    /// Sign a draft with the admin key, producing the roster file nodes load.
    Sign(SignArgs),
    /// Print a draft or a signed roster.
    Show(ShowArgs),
    /// Verify a signed roster against the admin's public id.
    Verify(VerifyArgs),
    /// Hand a signed roster of the next epoch to a running node, which adopts it and spreads it
    /// to every member by gossip.
    Push(PushArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The signed roster.
    pub roster: PathBuf,
    #[command(flatten)]
    pub target: super::daemon::Target,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Cluster name (`[A-Za-z0-9._-]`).
    #[arg(long)]
    pub cluster: String,
    /// Where to write the draft.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The draft to edit.
    pub draft: PathBuf,
    /// Unique member name.
    #[arg(long)]
    pub name: String,
    /// The member's node id (from `drift id`).
    #[arg(long)]
    pub id: NodeId,
    /// Roles: host (runs VMs) or observer. Repeatable.
    #[arg(long = "role", default_value = "host")]
    pub roles: Vec<String>,
    /// A label `key=value`, e.g. `region=eu-west` or `jurisdiction=de`. Repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Logical CPUs of the host.
    #[arg(long, default_value_t = 0)]
    pub cpus: u32,
    /// Memory of the host in MiB.
    #[arg(long, default_value_t = 0)]
    pub mem_mib: u64,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The draft to edit.
    pub draft: PathBuf,
    /// Member name or node id.
    pub member: String,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The draft to sign.
    pub draft: PathBuf,
    /// The admin key file.
    #[arg(long)]
    pub admin_key: PathBuf,
    /// Where to write the signed roster.
    #[arg(long)]
    pub out: PathBuf,
    /// The signed roster this one replaces: the new epoch is its epoch + 1, linked by hash.
    #[arg(long)]
    pub prev: Option<PathBuf>,
    /// How long the roster stays valid, in days.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u64,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A draft or a signed roster.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The signed roster.
    pub roster: PathBuf,
    /// The admin's public id (from `drift id ADMIN_KEY`).
    #[arg(long)]
    pub admin: NodeId,
    /// The roster of the previous epoch: also check the chain link.
    #[arg(long)]
    pub prev: Option<PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not key=value"))?;
    if !roster::valid_name(k) || !roster::valid_name(v) {
        return Err(format!(
            "label {s:?}: key and value must be 1 to 64 of [A-Za-z0-9._-]"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

fn overwrite(force: bool) -> Overwrite {
    if force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    }
}

pub(crate) fn run(cmd: RosterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RosterCommand::Init(a) => {
            if !roster::valid_name(&a.cluster) {
                bail!(
                    "cluster name {:?}: use 1 to 64 of [A-Za-z0-9._-]",
                    a.cluster
                );
            }
            let draft = RosterDraft {
                cluster: a.cluster,
                members: Vec::new(),
            };
            write_draft(&a.out, &draft, overwrite(a.force))?;
            eprintln!("wrote draft {}", a.out.display());
        }
        RosterCommand::Add(a) => {
            let mut draft = read_draft(&a.draft)?;
            if let Some(m) = draft
                .members
                .iter()
                .find(|m| m.name == a.name || m.id == a.id)
            {
                bail!(
                    "{} already has a member {:?} ({})",
                    a.draft.display(),
                    m.name,
                    m.id
                );
            }
            draft.members.push(DraftMember {
                name: a.name.clone(),
                id: a.id,
                roles: a.roles,
                cpus: a.cpus,
                mem_mib: a.mem_mib,
                labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
            });
            // Check the result as a roster before saving it.
            draft.to_roster(1, None, Timestamp(0), Timestamp(1))?;
            write_draft(&a.draft, &draft, Overwrite::Replace)?;
            eprintln!("added {} to {}", a.name, a.draft.display());
        }
        RosterCommand::Remove(a) => {
            let mut draft = read_draft(&a.draft)?;
            let before = draft.members.len();
            draft
                .members
                .retain(|m| m.name != a.member && m.id.to_string() != a.member);
            if draft.members.len() == before {
                bail!("{} has no member {:?}", a.draft.display(), a.member);
            }
            write_draft(&a.draft, &draft, Overwrite::Replace)?;
            eprintln!("removed {} from {}", a.member, a.draft.display());
        }
        RosterCommand::Sign(a) => sign(a)?,
        RosterCommand::Push(a) => {
            let signed = read_signed_roster(&a.roster)?;
            let socket = a.target.socket()?;
            let v: crate::control::RosterPushView = super::daemon::runtime()?.block_on(
                crate::control::client::post(&socket, "/v1/roster", encode_frame(&signed)),
            )?;
            if v.adopted {
                println!("adopted: the node is now at roster epoch {}", v.epoch);
            } else {
                println!("not newer: the node stays at roster epoch {}", v.epoch);
            }
        }
        RosterCommand::Show(a) => show(&a.file, a.json)?,
        RosterCommand::Verify(a) => {
            let signed = read_signed_roster(&a.roster)?;
            let now = now();
            let r = match &a.prev {
                None => roster::verify(&signed, &a.admin, Some(now)),
                Some(prev_path) => {
                    let prev = read_signed_roster(prev_path)?;
                    let prev_roster = roster::verify(&prev, &a.admin, None)
                        .with_context(|| format!("previous roster {}", prev_path.display()))?;
                    roster::verify_successor(&prev, &prev_roster, &signed, &a.admin, now)
                }
            }
            .with_context(|| format!("{} does not verify", a.roster.display()))?;
            println!(
                "ok: cluster {} epoch {} with {} members, signed by {}, valid until {}",
                r.cluster,
                r.epoch,
                r.members.len(),
                a.admin,
                r.not_after
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sign(a: SignArgs) -> anyhow::Result<()> {
    let draft = read_draft(&a.draft)?;
    let admin = read_key(&a.admin_key)?;
    let (epoch, prev) = match &a.prev {
        None => (1, None),
        Some(p) => {
            let prev = read_signed_roster(p)?;
            let prev_roster = roster::verify(&prev, &admin.public(), None).with_context(|| {
                format!(
                    "previous roster {} is not signed by this admin key",
                    p.display()
                )
            })?;
            if prev_roster.cluster != draft.cluster {
                bail!(
                    "draft is for cluster {:?}, previous roster for {:?}",
                    draft.cluster,
                    prev_roster.cluster
                );
            }
            (prev_roster.epoch + 1, Some(prev.hash()))
        }
    };
    let not_before = now();
    let not_after = not_before.plus_millis(a.valid_days.saturating_mul(86_400_000));
    let roster = draft.to_roster(epoch, prev, not_before, not_after)?;
    let signed = Signed::sign(&roster, &admin);
    write_signed_roster(&a.out, &signed, overwrite(a.force))?;
    eprintln!(
        "signed roster {} epoch {} ({} members) -> {}",
        roster.cluster,
        epoch,
        roster.members.len(),
        a.out.display()
    );
    Ok(())
}

fn show(path: &Path, json: bool) -> anyhow::Result<()> {
    // A signed roster is binary; a draft is TOML text.
    let (signed, roster, draft) = match read_signed_roster(path) {
        Ok(signed) => {
            let r: Roster = signed
                .verify()
                .with_context(|| format!("{} has a bad signature", path.display()))?;
            let draft = RosterDraft::from_roster(&r);
            (Some(signed), Some(r), draft)
        }
        Err(_) => (None, None, read_draft(path)?),
    };
    if json {
        let v = serde_json::json!({
            "signed": signed.is_some(),
            "signer": signed.as_ref().map(|s| s.signer().to_string()),
            "hash": signed.as_ref().map(|s| s.hash().to_string()),
            "epoch": roster.as_ref().map(|r| r.epoch),
            "prev": roster.as_ref().and_then(|r| r.prev).map(|h| h.to_string()),
            "not_before": roster.as_ref().map(|r| r.not_before.to_string()),
            "not_after": roster.as_ref().map(|r| r.not_after.to_string()),
            "cluster": draft.cluster,
            "members": draft.members,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match (&signed, &roster) {
        (Some(s), Some(r)) => {
            println!("cluster   {}", r.cluster);
            println!("epoch     {}", r.epoch);
            println!(
                "prev      {}",
                r.prev.map(|h| h.to_string()).unwrap_or_else(|| "-".into())
            );
            println!("valid     {} .. {}", r.not_before, r.not_after);
            println!("signer    {}", s.signer());
            println!("hash      {}", s.hash());
        }
        _ => {
            println!("cluster   {}", draft.cluster);
            println!("(unsigned draft)");
        }
    }
    println!();
    let rows: Vec<Vec<String>> = draft
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.id.to_string(),
                m.roles.join(","),
                m.cpus.to_string(),
                m.mem_mib.to_string(),
                m.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(&["NAME", "ID", "ROLES", "CPUS", "MEM_MIB", "LABELS"], &rows)
    );
    Ok(())
}
