//! `drift roster init | add | remove | sign | show | verify`.
//!
//! The admin edits a TOML draft, signs it into a roster file with the (offline) admin key, and
//! distributes the roster file to every node. The next epoch is signed from an edited draft with
//! `--prev` naming the roster it replaces, which links the two by hash.
//!
//! With several admins (a draft that names `admins` and a `threshold`), the epoch after it
//! needs that many of them: one admin signs the draft into an epoch file, the others each run
//! `drift roster sign` on that file on their own machines, in any order, adding their
//! signatures; `drift roster verify` and `show` say who signed and whether the threshold is met.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use drift_protocol::roster::{self, Admins, Endorsed, Roster};
use drift_protocol::{NodeId, Timestamp};

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
    /// Sign a draft with an admin key, producing the roster file nodes load; or add one more
    /// admin's signature to a signed roster file (for epochs that need several admins).
    Sign(SignArgs),
    /// Print a draft or a signed roster.
    Show(ShowArgs),
    /// Verify a signed roster against the admins' public ids (and its predecessor's admins).
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
    /// An admin id (from `drift id`) who may sign the next epoch. Repeatable; none: the
    /// nodes' configured admin.
    #[arg(long = "admin")]
    pub admins: Vec<NodeId>,
    /// How many of the admins must sign the next epoch.
    #[arg(long, requires = "admins")]
    pub threshold: Option<u8>,
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
    /// The draft to sign, or a signed roster to add this admin's signature to.
    pub draft: PathBuf,
    /// The admin key file.
    #[arg(long)]
    pub admin_key: PathBuf,
    /// Where to write the signed roster (required for a draft; for a signed roster, default:
    /// the file itself).
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    /// The trusted admin's public id (from `drift id ADMIN_KEY`), as in the nodes' `admin`.
    /// Repeatable.
    #[arg(long = "admin", required = true)]
    pub admins: Vec<NodeId>,
    /// How many of the trusted admins must have signed (default 1), as in the nodes'
    /// `admin_threshold`.
    #[arg(long)]
    pub threshold: Option<u8>,
    /// The roster of the previous epoch: also check the chain link, and check the roster's
    /// signatures against the previous epoch's admins when it names them.
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
                threshold: a.threshold.or((!a.admins.is_empty()).then_some(1)),
                admins: a.admins,
                members: Vec::new(),
            };
            if let Some(admins) = draft.admin_set() {
                admins.check()?;
            }
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
                crate::control::client::post(&socket, "/v1/roster", signed.encode_frame()),
            )?;
            if v.adopted {
                println!("adopted: the node is now at roster epoch {}", v.epoch);
            } else {
                println!("not newer: the node stays at roster epoch {}", v.epoch);
            }
        }
        RosterCommand::Show(a) => show(&a.file, a.json)?,
        RosterCommand::Verify(a) => verify(a)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let trust = Admins {
        keys: a.admins.clone(),
        threshold: a.threshold.unwrap_or(1),
    };
    trust.check().context("--admin/--threshold")?;
    let signed = read_signed_roster(&a.roster)?;
    let now = now();
    let (r, governing) = match &a.prev {
        None => (roster::verify(&signed, &trust, Some(now)), trust.clone()),
        Some(prev_path) => {
            let prev = read_signed_roster(prev_path)?;
            let prev_roster = roster::verify(&prev, &trust, None)
                .with_context(|| format!("previous roster {}", prev_path.display()))?;
            (
                roster::verify_successor(&prev, &prev_roster, &signed, &trust, now),
                roster::chain::governing(&prev_roster, &trust),
            )
        }
    };
    let r = r.with_context(|| format!("{} does not verify", a.roster.display()))?;
    println!(
        "ok: cluster {} epoch {} with {} members, {}, valid until {}",
        r.cluster,
        r.epoch,
        r.members.len(),
        signed_by(&signed, &governing),
        r.not_after
    );
    Ok(())
}

/// "signed by A, B (2 of 3 admins needed: met)".
fn signed_by(signed: &Endorsed, governing: &Admins) -> String {
    let valid = signed.valid_signers();
    let counted: Vec<String> = valid
        .iter()
        .filter(|k| governing.keys.contains(k))
        .map(ToString::to_string)
        .collect();
    format!(
        "signed by {} ({} needed: {})",
        if counted.is_empty() {
            "no admin".to_string()
        } else {
            counted.join(", ")
        },
        governing,
        if counted.len() >= usize::from(governing.threshold) {
            "met"
        } else {
            "NOT met"
        }
    )
}

fn sign(a: SignArgs) -> anyhow::Result<()> {
    let admin = read_key(&a.admin_key)?;
    // A signed roster: add this admin's signature to it.
    if let Ok(mut endorsed) = read_signed_roster(&a.draft) {
        if a.prev.is_some() {
            bail!(
                "{} is already a signed roster: --prev applies only when signing a draft",
                a.draft.display()
            );
        }
        let r: Roster = endorsed
            .signed
            .decode_unverified()
            .with_context(|| format!("{} does not hold a roster", a.draft.display()))?;
        let before = endorsed.valid_signers().len();
        endorsed.endorse(&admin)?;
        let out = a.out.as_ref().unwrap_or(&a.draft);
        let force = a.force || a.out.is_none();
        write_signed_roster(out, &endorsed, overwrite(force))?;
        let after = endorsed.valid_signers();
        eprintln!(
            "{} roster {} epoch {}: {} valid signature(s) ({}) -> {}",
            if after.len() > before {
                "signed"
            } else {
                "already signed"
            },
            r.cluster,
            r.epoch,
            after.len(),
            after
                .iter()
                .map(NodeId::short)
                .collect::<Vec<_>>()
                .join(", "),
            out.display()
        );
        return Ok(());
    }
    let Some(out) = &a.out else {
        bail!("signing a draft needs --out (where to write the signed roster)");
    };
    let draft = read_draft(&a.draft)?;
    let (epoch, prev) = match &a.prev {
        None => (1, None),
        Some(p) => {
            let prev = read_signed_roster(p)?;
            let prev_roster: Roster = prev
                .signed
                .decode_unverified()
                .with_context(|| format!("previous roster {}", p.display()))?;
            // Who may sign this epoch: the previous epoch's admins, or (when it names none)
            // whoever signed it, as a single admin does.
            let allowed = match &prev_roster.admins {
                Some(admins) => admins.keys.contains(&admin.public()),
                None => prev.valid_signers().contains(&admin.public()),
            };
            if !allowed {
                bail!(
                    "this admin key ({}) may not sign the epoch after {}: {}",
                    admin.public(),
                    p.display(),
                    match &prev_roster.admins {
                        Some(admins) => format!(
                            "that epoch names {} ({})",
                            admins,
                            admins
                                .keys
                                .iter()
                                .map(NodeId::short)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        None => "it is not signed by this admin key".into(),
                    }
                );
            }
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
    let signed = Endorsed::sign(&roster, &admin);
    write_signed_roster(out, &signed, overwrite(a.force))?;
    eprintln!(
        "signed roster {} epoch {} ({} members{}) -> {}",
        roster.cluster,
        epoch,
        roster.members.len(),
        roster
            .admins
            .as_ref()
            .map(|a| format!("; the next epoch needs {a}"))
            .unwrap_or_default(),
        out.display()
    );
    Ok(())
}

fn show(path: &Path, json: bool) -> anyhow::Result<()> {
    // A signed roster is binary; a draft is TOML text.
    let (signed, roster, draft) = match read_signed_roster(path) {
        Ok(signed) => {
            if !signed.valid_signers().contains(signed.signed.signer()) {
                bail!("{} has a bad signature", path.display());
            }
            let r: Roster = signed
                .signed
                .decode_unverified()
                .with_context(|| format!("{} does not hold a roster", path.display()))?;
            let draft = RosterDraft::from_roster(&r);
            (Some(signed), Some(r), draft)
        }
        // A draft is text; a file that is not is a damaged signed roster, and says so.
        Err(e) if std::fs::read_to_string(path).is_err() => return Err(e.into()),
        Err(_) => (None, None, read_draft(path)?),
    };
    if json {
        let v = serde_json::json!({
            "signed": signed.is_some(),
            "signer": signed.as_ref().map(|s| s.signed.signer().to_string()),
            "signers": signed.as_ref().map(|s| s.valid_signers().iter().map(ToString::to_string).collect::<Vec<_>>()),
            "admins": roster.as_ref().and_then(|r| r.admins.as_ref()).map(|a| a.keys.iter().map(ToString::to_string).collect::<Vec<_>>()),
            "threshold": roster.as_ref().and_then(|r| r.admins.as_ref()).map(|a| a.threshold),
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
            for (i, k) in s.valid_signers().iter().enumerate() {
                println!("{}{k}", if i == 0 { "signed by " } else { "          " });
            }
            let bad = s.claimed_signers().count() - s.valid_signers().len();
            if bad > 0 {
                println!("          ({bad} signature(s) that do not verify)");
            }
            println!("hash      {}", s.hash());
            match &r.admins {
                Some(admins) => {
                    println!("next      needs {admins}:");
                    for k in &admins.keys {
                        println!("          {k}");
                    }
                }
                None => println!("next      needs the nodes' configured admin"),
            }
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
