//! A pure data-center simulator for the placement benchmark of Beloglazov & Buyya 2012
//! (CCPE 24(13)): a PlanetLab day replayed on 800 HP G4/G5 hosts, with the published policies
//! (THR, IQR, MAD, LR overload detection + MMT selection + power-aware best-fit-decreasing
//! placement + underload consolidation), migrations that take time and degrade the VM, and the
//! paper's metrics (energy, SLATAH, PDM, SLAV, ESV) computed as the reference simulator,
//! CloudSim 3.0.3, computes them.
//!
//! No I/O: the caller reads the trace files and passes their text to [`Trace::parse`].
//!
//! ## Layout
//!
//! - [`model`]: host and VM types, SPECpower models, the [`Scenario`].
//! - [`trace`]: [`Trace`] parsing and its demand at any time.
//! - [`published`]: the published [`Policy`] values and the statistics they use.
//! - [`run`]: the time loop ([`run()`], [`run_with`]), the [`Planner`] trait any policy can
//!   implement, and the [`View`] it plans from.
//! - [`metrics`]: the [`Report`] and how each figure is integrated.
//!
//! ## Use
//!
//! ```
//! use drift_protocol::dcsim::{run, Policy, Scenario, Trace};
//! let traces: Vec<Trace> = (0..8)
//!     .map(|i| Trace::from_fractions(&format!("vm{i}"), (0..12).map(|k| ((i + k) % 5) as f64 / 5.0)))
//!     .collect();
//! let report = run(&Scenario::paper(4), &traces, Policy::Thr { threshold: 0.8 }, &mut |_, _| {});
//! assert_eq!(report.steps, 11);
//! ```
//!
//! ## Plugging in another policy
//!
//! Implement [`Planner`]: `plan(&mut self, view: &View) -> Plan` is called once per step after
//! the hosts' update, with every VM's demand and utilization history and every host's VMs and
//! utilization; the [`Move`]s it returns start at once, take `RAM / bandwidth`, and are metered
//! like the published ones. Then call [`run_with`].

pub mod metrics;
pub mod model;
pub mod published;
pub mod run;
pub mod trace;

pub use metrics::{Report, StepSample};
pub use model::{HostType, PowerModel, Scenario, VmType};
pub use published::Policy;
pub use run::{run, run_with, InitialPlacement, Move, Plan, Planner, View};
pub use trace::{Trace, TraceError};
