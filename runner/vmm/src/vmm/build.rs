//! Making a VM from its configuration: memory and kernel, devices, ACPI tables, vCPUs; and
//! assembling the parts (also a restored VM's) into a [`Vmm`] ready to run.

use super::devices::{create_devices, DeviceSpec, Devices};
use super::{io, Error, ExitSignal, OwnedSocket, Vmm};
use crate::acpi;
use crate::boot::{self, long_mode};
use crate::config::VmConfig;
use crate::devices::serial::SerialOutput;
use crate::memory;
use crate::vcpu::control::VcpuControl;
use crate::vcpu::run::VcpuContext;
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use kvm_bindings::kvm_cpuid_entry2;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

impl Vmm {
    /// Creates the VM described by `cfg`: memory, kernel, devices, ACPI tables and vCPUs.
    /// Nothing outlives a failure: sockets are removed and TAP devices closed on the way out.
    pub fn build(cfg: &VmConfig, console: SerialOutput) -> Result<Vmm, Error> {
        cfg.validate()?;
        let mut kernel = File::open(&cfg.kernel).map_err(io("cannot open the kernel"))?;
        let mut initrd = match &cfg.initrd {
            Some(p) => Some(File::open(p).map_err(io("cannot open the initrd"))?),
            None => None,
        };
        let mem = memory::create(cfg.memory_mib << 20).map_err(|e| Error::Vm(e.into()))?;
        let vm = Vm::new(mem.clone())?;
        let entry = boot::load(&mem, &mut kernel, initrd.as_mut(), &cfg.cmdline)?;
        long_mode::write_tables(&mem).map_err(Error::PageTables)?;

        let exit = Arc::new(ExitSignal::new().map_err(io("cannot create the exit event"))?);
        let spec = DeviceSpec {
            rootfs: cfg
                .rootfs
                .as_deref()
                .map(|path| (path, cfg.rootfs_read_only)),
            net: cfg.net.clone(),
            agent_socket: cfg.agent_socket.as_deref(),
        };
        let (devices, infos) = create_devices(&vm, &spec, &exit, console)?;
        acpi::write_tables(&mem, cfg.cpus, &infos)?;

        let supported = vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = Vcpu::new(&vm.fd, id)?;
            vcpu.configure(&supported, cfg.cpus, (id == 0).then_some(&entry))?;
            vcpus.push(vcpu);
        }
        let cpuid = vcpus[0].cpuid()?;
        Self::assemble(
            vm,
            cfg.memory_mib,
            vcpus,
            cpuid,
            devices,
            exit,
            cfg.api_socket.as_deref(),
        )
    }

    pub(crate) fn assemble(
        vm: Vm,
        memory_mib: u64,
        vcpus: Vec<Vcpu>,
        cpuid: Vec<kvm_cpuid_entry2>,
        devices: Devices,
        exit: Arc<ExitSignal>,
        api_socket: Option<&Path>,
    ) -> Result<Vmm, Error> {
        let mut sockets = devices.sockets;
        let api = match api_socket {
            Some(path) => {
                let (owned, listener) = OwnedSocket::bind(path, "API socket")?;
                sockets.push(owned);
                Some(listener)
            }
            None => None,
        };
        let ctx = VcpuContext {
            pio: devices.pio,
            mmio: devices.mmio,
            exit,
            control: Arc::new(VcpuControl::default()),
        };
        Ok(Vmm {
            vm: Arc::new(vm),
            memory_mib,
            cpuid,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            ctx,
            devices: devices.subscribers,
            parts: devices.parts,
            api,
            _sockets: sockets,
        })
    }
}
