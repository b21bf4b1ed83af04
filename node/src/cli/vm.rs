//! `drift vms`, `drift vm create | verify | destroy`, and the hidden `drift vmm`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::daemon::{runtime, Target};
use crate::control::{client, CreateVm, VerifyView, VmsView};

#[derive(Debug, Args)]
pub struct VmsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start a VM on the node: a sandbox VM, or a QEMU VM with `--backend qemu`.
    Create(Box<CreateArgs>),
    /// Check a VM's memory page by page.
    Verify(NameArgs),
    /// Stop a VM and delete it.
    Destroy(NameArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name on the node.
    pub name: String,
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// CPU demand as a fraction of the host (0.0 to 1.0).
    #[arg(long, default_value_t = 0.1)]
    pub demand: f64,
    /// MiB of memory the workload rewrites per second.
    #[arg(long, default_value_t = 4.0)]
    pub dirty_mib_per_s: f64,
    /// Percent of each page the workload writes random, the rest text that compresses
    /// (sandbox VMs; default 100: nothing compresses).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub page_random_pct: Option<u8>,
    /// Jurisdictions the VM may run in (repeatable; none: anywhere).
    #[arg(long = "jurisdiction")]
    pub jurisdictions: Vec<String>,
    /// Regions the VM may run in (repeatable; none: anywhere).
    #[arg(long = "region")]
    pub regions: Vec<String>,
    /// Anti-affinity group: VMs of one group never share a host.
    #[arg(long)]
    pub anti_affinity: Option<String>,
    /// `sandbox` (synthetic, built in) or `qemu`.
    #[arg(long, default_value = "sandbox", value_parser = ["sandbox", "qemu"])]
    pub backend: String,
    #[command(flatten)]
    pub qemu: QemuArgs,
    #[command(flatten)]
    pub target: Target,
}

/// The machine of a QEMU VM (`--backend qemu`). Paths must be absolute and name the same
/// files on every host the VM may move to.
#[derive(Debug, Args)]
pub struct QemuArgs {
    /// Guest kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub append: String,
    /// Raw disk image (virtio).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// One more QEMU argument (repeatable, in order).
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Migrate over this many parallel channels (QEMU multifd; 0: one stream).
    #[arg(long, default_value_t = 0)]
    pub multifd_channels: u32,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// VM name or id.
    pub vm: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct VmmArgs {
    /// The VM's directory (holds vm.toml).
    #[arg(long)]
    pub dir: PathBuf,
}

pub(crate) fn vms(a: VmsArgs) -> anyhow::Result<ExitCode> {
    let socket = a.target.socket()?;
    let v: VmsView = runtime()?.block_on(client::get(&socket, "/v1/vms"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = v
        .vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.id.short(),
                format!("{}M", vm.memory_mib),
                format!("{:.0}%", f64::from(vm.demand_permille) / 10.0),
                vm.state.to_string(),
                match &vm.accel {
                    Some(accel) => format!("{}/{accel}", vm.backend),
                    None => vm.backend.clone(),
                },
                v.host.clone(),
                vm.placement.jurisdictions.join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        super::table::render(
            &[
                "NAME",
                "ID",
                "MEMORY",
                "DEMAND",
                "STATE",
                "BACKEND",
                "HOST",
                "JURISDICTIONS"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match cmd {
        VmCommand::Create(a) => {
            if !(0.0..=1.0).contains(&a.demand) {
                anyhow::bail!("--demand must be between 0.0 and 1.0");
            }
            let qemu = match (a.backend.as_str(), a.qemu.kernel) {
                ("qemu", Some(kernel)) => Some(crate::hypervisor::qemu::QemuSpec {
                    kernel: std::path::absolute(&kernel)?,
                    initrd: a.qemu.initrd.map(std::path::absolute).transpose()?,
                    append: a.qemu.append,
                    disk: a.qemu.disk.map(std::path::absolute).transpose()?,
                    extra_args: a.qemu.qemu_args,
                    multifd_channels: a.qemu.multifd_channels,
                }),
                ("qemu", None) => anyhow::bail!("--backend qemu needs --kernel"),
                _ => None,
            };
            let req = CreateVm {
                name: a.name,
                memory_mib: a.memory_mib,
                vcpus: a.vcpus,
                demand: a.demand,
                dirty_mib_per_s: a.dirty_mib_per_s,
                page_random_pct: a.page_random_pct,
                jurisdictions: a.jurisdictions,
                regions: a.regions,
                anti_affinity: a.anti_affinity,
                qemu,
            };
            let socket = a.target.socket()?;
            let vm: crate::hypervisor::VmView =
                rt.block_on(client::post(&socket, "/v1/vms", serde_json::to_vec(&req)?))?;
            match &vm.accel {
                Some(accel) => println!("{} {} {} (qemu, {accel})", vm.name, vm.id, vm.state),
                None => println!("{} {} {}", vm.name, vm.id, vm.state),
            }
        }
        VmCommand::Verify(a) => {
            let socket = a.target.socket()?;
            let v: VerifyView = rt.block_on(client::post(
                &socket,
                &format!("/v1/vms/{}/verify", a.vm),
                Vec::new(),
            ))?;
            let r = &v.report;
            if r.bad_count > 0 {
                println!(
                    "BAD: {} has {} bad pages (first: {:?})",
                    a.vm, r.bad_count, r.bad
                );
                return Ok(ExitCode::FAILURE);
            } else if r.missing > 0 {
                println!(
                    "INCOMPLETE: {} lacks {} of {} pages (post-copy lost its source)",
                    a.vm, r.missing, r.pages
                );
                return Ok(ExitCode::FAILURE);
            } else {
                println!(
                    "ok: {} verified clean: {} pages, {} written",
                    a.vm, r.pages, r.written
                );
            }
        }
        VmCommand::Destroy(a) => {
            let socket = a.target.socket()?;
            let _: serde_json::Value =
                rt.block_on(client::delete(&socket, &format!("/v1/vms/{}", a.vm)))?;
            println!("destroyed {}", a.vm);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn vmm(a: VmmArgs) -> anyhow::Result<ExitCode> {
    crate::hypervisor::vmm::run(&a.dir)?;
    Ok(ExitCode::SUCCESS)
}
