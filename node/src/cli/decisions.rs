//! `drift decisions`: the balancing autopilot's newest decisions, explained.

use std::process::ExitCode;

use clap::Args;

use super::daemon::{runtime, Target};
use crate::autopilot::{Action, DecisionRecord};
use crate::control::{client, DecisionsView};

#[derive(Debug, Args)]
pub struct DecisionsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only the newest N decisions.
    #[arg(long)]
    pub last: Option<usize>,
    /// Print JSON (`GET /v1/decisions`).
    #[arg(long)]
    pub json: bool,
}

fn action(a: &Action) -> String {
    match a {
        Action::None => "-".into(),
        Action::DryRun => "dry run: not offered".into(),
        Action::Offered { migration, state } => {
            format!("offered: migration {} {state}", migration.short())
        }
        Action::Refused {
            label,
            reason,
            retry_after,
        } => format!("refused ({label}: {reason}); target left out until {retry_after}"),
        Action::Unreachable { error, retry_after } => {
            format!("no answer ({error}); target left out until {retry_after}")
        }
        Action::Failed { error } => format!("not started: {error}"),
        Action::Unmovable { retry_after } => {
            format!("not offered: predicted not to move within its limits; VM left out until {retry_after}")
        }
    }
}

/// One decision as text: `#seq time [×n]  action\n    explanation`.
pub(crate) fn render(r: &DecisionRecord) -> String {
    let repeated = if r.repeated > 1 {
        format!(" ×{} since {}", r.repeated, r.first_at)
    } else {
        String::new()
    };
    let mut out = format!(
        "#{} {}{repeated}  {}\n    {}",
        r.seq,
        r.decision.at,
        action(&r.action),
        r.explanation
    );
    if !r.backing_off.is_empty() {
        let hosts: Vec<String> = r.backing_off.iter().map(|n| n.short()).collect();
        out.push_str(&format!(
            "\n    left out after a refusal: {}",
            hosts.join(", ")
        ));
    }
    out
}

pub(crate) fn decisions(a: DecisionsArgs) -> anyhow::Result<ExitCode> {
    let socket = a.target.socket()?;
    let mut v: DecisionsView = runtime()?.block_on(client::get(&socket, "/v1/decisions"))?;
    if let Some(n) = a.last {
        let skip = v.decisions.len().saturating_sub(n);
        v.decisions.drain(..skip);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mode = match (v.enabled, v.dry_run) {
        (false, _) => "off (balance.enabled = false)",
        (true, true) => "on, dry run (decisions are logged, nothing is offered)",
        (true, false) => "on",
    };
    println!(
        "autopilot of {}: {mode}; upper threshold {}‰",
        v.node.short(),
        v.upper_permille
    );
    if v.decisions.is_empty() {
        println!("no decisions yet");
    }
    for r in &v.decisions {
        println!("{}", render(r));
    }
    Ok(ExitCode::SUCCESS)
}
