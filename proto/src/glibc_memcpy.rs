//! Working around slow `rep movsb` copies on AMD Zen 3 and Zen 4 under glibc before 2.40.
//!
//! glibc before 2.40 copies blocks from about 2 KiB up to the L2 cache size with `rep movsb`
//! on AMD CPUs that report ERMS. On Zen 3 and Zen 4 that instruction is many times slower
//! when the destination lies 1–63 bytes past the source modulo 4 KiB (glibc bug 30994; fixed
//! in 2.40, which no longer uses it below the non-temporal threshold on these CPUs). rustls
//! hits exactly that case: it copies each 16 KiB of plaintext into a fresh record buffer five
//! bytes past its start. On a Zen 4 host with Debian 12's glibc 2.36 that one copy took a
//! quarter of the control plane's CPU while it sent an artifact, 2.6 times the AES-GCM
//! encryption beside it (see `docs/BENCHMARKS.md`).
//!
//! The threshold is a glibc tunable, read once when the process starts, so the fix is to
//! restart the process image with it set: [`reexec_if_memcpy_is_slow`] does that before the
//! binary does anything else. A host where an operator already chose
//! `glibc.cpu.x86_rep_movsb_threshold` in `GLIBC_TUNABLES` is left as it is.

use std::ffi::{OsStr, OsString};

/// The tunable glibc reads, and its name inside `GLIBC_TUNABLES`.
const TUNABLES_VAR: &str = "GLIBC_TUNABLES";
const THRESHOLD: &str = "glibc.cpu.x86_rep_movsb_threshold";
/// Above the L2 size of every affected CPU (512 KiB on Zen 3, 1 MiB on Zen 4), where glibc
/// stops using `rep movsb` on AMD anyway: no copy takes the slow path.
const THRESHOLD_BYTES: u64 = 4 << 20;
const RESTART_FAILED: &str = "could not restart with faster copies for this AMD CPU; going on \
                              with glibc's defaults";

/// What decides whether a host is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub amd: bool,
    /// The CPU reports ERMS ("enhanced rep movsb"), which is what makes glibc use it.
    pub erms: bool,
    /// glibc's (major, minor) version; `None` when not linked against glibc.
    pub glibc: Option<(u32, u32)>,
}

impl Host {
    /// This process's CPU and C library.
    pub fn current() -> Self {
        let (amd, erms) = cpu();
        Self {
            amd,
            erms,
            glibc: glibc_version(),
        }
    }

    fn affected(&self) -> bool {
        self.amd && self.erms && self.glibc.is_some_and(|v| v < (2, 40))
    }
}

/// The `GLIBC_TUNABLES` value this process should run with, given what it holds now; `None`
/// when nothing needs to change.
pub fn tunables_for(host: Host, current: Option<&OsStr>) -> Option<OsString> {
    if !host.affected() {
        return None;
    }
    let setting = format!("{THRESHOLD}={THRESHOLD_BYTES}");
    match current {
        Some(current) if current.to_string_lossy().contains(THRESHOLD) => None,
        Some(current) if !current.is_empty() => {
            let mut value = current.to_owned();
            value.push(":");
            value.push(setting);
            Some(value)
        }
        _ => Some(setting.into()),
    }
}

/// Restarts this process image with the `rep movsb` threshold raised where glibc would take
/// the slow path; returns without doing anything elsewhere. Call it first in `main`, before
/// any thread starts. If the restart fails, the process goes on with glibc's defaults and
/// says why on stderr.
pub fn reexec_if_memcpy_is_slow() {
    let Some(tunables) = tunables_for(Host::current(), std::env::var_os(TUNABLES_VAR).as_deref())
    else {
        return;
    };
    use std::os::unix::process::CommandExt;
    // The binary's own path rather than `/proc/self/exe`, whose name ("exe") would become
    // the process name that `ps` and `pgrep` show.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("warning: {RESTART_FAILED}: cannot find this binary's path: {error}");
            return;
        }
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(argv0) = args.next() {
        command.arg0(argv0);
    }
    // `exec` only returns on failure.
    let error = command.args(args).env(TUNABLES_VAR, &tunables).exec();
    eprintln!(
        "warning: {RESTART_FAILED} ({TUNABLES_VAR}={}): {error}",
        tunables.to_string_lossy()
    );
}

#[cfg(target_arch = "x86_64")]
fn cpu() -> (bool, bool) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let vendor = __cpuid(0);
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&vendor.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&vendor.edx.to_le_bytes());
    name[8..].copy_from_slice(&vendor.ecx.to_le_bytes());
    let erms = vendor.eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 9) != 0;
    (&name == b"AuthenticAMD", erms)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu() -> (bool, bool) {
    (false, false)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "glibc's gnu_get_libc_version has no safe binding"
)]
fn glibc_version() -> Option<(u32, u32)> {
    // SAFETY: glibc returns a pointer to a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let mut parts = version.to_str().ok()?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_version() -> Option<(u32, u32)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4_DEBIAN12: Host = Host {
        amd: true,
        erms: true,
        glibc: Some((2, 36)),
    };

    #[test]
    fn an_amd_cpu_with_erms_under_glibc_before_2_40_gets_the_threshold_raised() {
        assert_eq!(
            tunables_for(ZEN4_DEBIAN12, None).unwrap(),
            "glibc.cpu.x86_rep_movsb_threshold=4194304"
        );
        assert_eq!(
            tunables_for(ZEN4_DEBIAN12, Some(OsStr::new(""))).unwrap(),
            "glibc.cpu.x86_rep_movsb_threshold=4194304"
        );
    }

    #[test]
    fn other_tunables_the_operator_set_are_kept() {
        assert_eq!(
            tunables_for(ZEN4_DEBIAN12, Some(OsStr::new("glibc.malloc.arena_max=2"))).unwrap(),
            "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4194304"
        );
    }

    #[test]
    fn an_operators_own_threshold_is_left_alone() {
        let chosen = OsStr::new("glibc.cpu.x86_rep_movsb_threshold=2112");
        assert_eq!(tunables_for(ZEN4_DEBIAN12, Some(chosen)), None);
    }

    #[test]
    fn intel_cpus_fixed_glibc_and_other_c_libraries_are_left_alone() {
        let intel = Host {
            amd: false,
            ..ZEN4_DEBIAN12
        };
        let no_erms = Host {
            erms: false,
            ..ZEN4_DEBIAN12
        };
        let fixed = Host {
            glibc: Some((2, 40)),
            ..ZEN4_DEBIAN12
        };
        let newer = Host {
            glibc: Some((3, 0)),
            ..ZEN4_DEBIAN12
        };
        let musl = Host {
            glibc: None,
            ..ZEN4_DEBIAN12
        };
        for host in [intel, no_erms, fixed, newer, musl] {
            assert_eq!(tunables_for(host, None), None, "{host:?}");
        }
    }

    #[test]
    fn this_hosts_glibc_version_is_read() {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let (major, minor) = Host::current().glibc.expect("glibc version");
            assert!(major >= 2 && minor > 0, "{major}.{minor}");
        }
    }
}
