//! A real systemd for the unit tests: the host's own systemd boots as PID 1 of
//! a throw-away `systemd-nspawn` container, on an overlay of the host's `/`
//! whose writable layer lives on a tmpfs in a private mount namespace. The
//! container shares the host's network namespace, so sqlgate inside reaches
//! the PostgreSQL nodes the tests start on the host's loopback, and the tests
//! reach sqlgate on the port they put in its config.
//!
//! How it boots (needs root and `systemd-nspawn`, package `systemd-container`):
//! 1. a private cgroup `sqlgate-box-…` in both hierarchies (`unified`, the
//!    named `systemd` one) takes the launcher, so nspawn's `payload/` and
//!    `supervisor/` cgroups land there and can be killed and removed after;
//! 2. `unshare -m`: a tmpfs on `/run` holds the overlay's upper and work dirs
//!    (on the root filesystem itself the kernel refuses overlapping layers);
//! 3. into the overlay: a fresh machine id, the enabled host units masked (the
//!    packaged PostgreSQL must not start in the host's network), the files of
//!    [`BoxFiles`] copied in;
//! 4. `systemd-nspawn -b` with `--register=no --keep-unit` (no host bus).
//!
//! [`SystemdBox`] powers the container off on drop, kills what is left in its
//! cgroup and removes the cgroup; a guard process does the same if the test
//! process dies without unwinding (its stdin pipe closes). Nothing is left on
//! the host: the mounts die with the mount namespace.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::SQLGATE;

/// How long the container's systemd gets to reach `running`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean poweroff gets before the cgroup is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(15);
/// Default bound of one command run in the container.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Units that Debian images enable and that must not run in a test container
/// sharing the host's network (beyond everything in `/etc/systemd/system/*.wants`).
const MASKED: &[&str] = &[
    "console-getty.service",
    "getty@tty1.service",
    "postgresql.service",
    "pgbouncer.service",
    "haproxy.service",
    "stunnel4.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "e2scrub_reap.service",
];

/// PATH for commands run inside the container.
const PATH: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs in the private cgroup; sets up the private mount namespace and the
/// overlay, then becomes systemd-nspawn. `$1`: machine name, `$2`: files dir.
const LAUNCH: &str = r#"
set -eu
name=$1
files=$2
for h in unified systemd; do echo $$ > /sys/fs/cgroup/$h/$name/cgroup.procs; done
exec unshare -m --propagation private /bin/sh -c '
set -eu
name=$1
files=$2
masked=$3
mount -n -t tmpfs -o mode=755,size=2G sqlgate-box /run
mkdir -p /run/box/upper /run/box/work /run/box/root
mount -n -t overlay sqlgate-box -o lowerdir=/,upperdir=/run/box/upper,workdir=/run/box/work /run/box/root
R=/run/box/root
tr -d - </proc/sys/kernel/random/uuid >$R/etc/machine-id
for u in $R/etc/systemd/system/*.wants/*.service $R/etc/systemd/system/*.wants/*.timer; do
    [ -L "$u" ] || [ -e "$u" ] || continue
    ln -sf /dev/null "$R/etc/systemd/system/${u##*/}"
done
for u in $masked; do ln -sf /dev/null "$R/etc/systemd/system/$u"; done
cp -a "$files"/. $R/
exec systemd-nspawn -q -D $R -M "$name" --register=no --keep-unit --link-journal=no \
    --console=read-only --system-call-filter=bpf --capability=CAP_NET_ADMIN \
    -b systemd.unit=multi-user.target
' sqlgate-box "$name" "$files" "$3"
"#;

/// Waits for its stdin to close (the test process ended, however), then kills
/// whatever is left in the box's cgroup and removes it, and the staging files.
/// `$1`: cgroup name, `$2`: staging dir, `$3`: console log.
const GUARD: &str = r#"
cat >/dev/null
name=$1
rm -rf "$2" "$3"
[ -d /sys/fs/cgroup/unified/$name ] || [ -d /sys/fs/cgroup/systemd/$name ] || exit 0
[ -e /sys/fs/cgroup/unified/$name/cgroup.kill ] && echo 1 > /sys/fs/cgroup/unified/$name/cgroup.kill
for i in 1 2 3 4 5 6 7 8 9 10; do
    for h in unified systemd; do
        [ -d /sys/fs/cgroup/$h/$name ] && find /sys/fs/cgroup/$h/$name -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    [ -d /sys/fs/cgroup/unified/$name ] || [ -d /sys/fs/cgroup/systemd/$name ] || exit 0
    sleep 0.2
done
"#;

/// Files to put into the container's root, staged in a host temp dir.
pub struct BoxFiles {
    dir: TempDir,
}

impl BoxFiles {
    pub fn new() -> BoxFiles {
        let dir = tempfile::Builder::new()
            .prefix("sqlgate-box-files-")
            .tempdir()
            .expect("create the staging dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod staging dir");
        BoxFiles { dir }
    }

    /// Writes `contents` at `path` (absolute, inside the container) with `mode`.
    pub fn write(&self, path: &str, contents: impl AsRef<[u8]>, mode: u32) {
        let target = self.staged(path);
        fs::write(&target, contents).unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", target.display()));
    }

    /// Copies the host file `from` to `path` inside the container with `mode`.
    pub fn copy(&self, from: &Path, path: &str, mode: u32) {
        let target = self.staged(path);
        fs::copy(from, &target)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), target.display()));
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", target.display()));
    }

    fn staged(&self, path: &str) -> PathBuf {
        let relative = path
            .strip_prefix('/')
            .expect("container paths are absolute");
        let target = self.dir.path().join(relative);
        let parent = target.parent().expect("a file path has a parent");
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        // Directories made here are what the container gets: keep them traversable.
        let mut dir = parent;
        while dir != self.dir.path() {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
            dir = dir.parent().expect("inside the staging dir");
        }
        target
    }
}

/// A container running systemd as PID 1; powered off and removed on drop.
pub struct SystemdBox {
    name: String,
    leader: u32,
    nspawn: Child,
    guard: Option<(Child, ChildStdin)>,
    console: PathBuf,
    files: BoxFiles,
}

impl SystemdBox {
    /// Boots a container with `files` copied into its root and waits until
    /// its systemd reports `running` (or `degraded`).
    ///
    /// Panics (the test fails) when `systemd-nspawn` is missing or the boot fails.
    pub fn boot(files: BoxFiles) -> SystemdBox {
        assert!(
            Path::new("/usr/bin/systemd-nspawn").exists(),
            "systemd-nspawn is missing: the systemd tests need it (apt-get install systemd-container)"
        );
        assert!(
            Path::new("/sys/fs/cgroup/unified").is_dir()
                || Path::new("/sys/fs/cgroup/cgroup.procs").exists(),
            "no cgroup2 hierarchy at /sys/fs/cgroup/unified"
        );
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "sqlgate-box-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        for hierarchy in ["unified", "systemd"] {
            let dir = cgroup_dir(hierarchy, &name);
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        // The guard first: from here on, the cgroup goes away whatever happens.
        let console = files.dir.path().with_extension("console.log");
        let guard = Command::new("/bin/sh")
            .args(["-c", GUARD, "sqlgate-box-guard", &name])
            .arg(files.dir.path())
            .arg(&console)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|mut child| {
                let stdin = child.stdin.take().expect("stdin is piped");
                (child, stdin)
            })
            .expect("spawn the cleanup guard");
        let log = fs::File::create(&console).expect("create the console log");
        let nspawn = Command::new("/bin/sh")
            .args(["-c", LAUNCH, "sqlgate-box-launch", &name])
            .arg(files.dir.path())
            .arg(MASKED.join(" "))
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup console log"))
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut booting = SystemdBox {
            name,
            leader: 0,
            nspawn,
            guard: Some(guard),
            console,
            files,
        };
        booting.wait_booted();
        booting
    }

    fn wait_booted(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited with {status} during boot:\n{}",
                    self.console_log()
                );
            }
            if self.leader == 0 {
                self.leader = self.find_leader().unwrap_or(0);
            }
            if self.leader != 0
                && Path::new(&format!("/proc/{}/root/run/systemd/private", self.leader)).exists()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not come up within {BOOT_TIMEOUT:?}:\n{}",
                self.console_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.run_within(&["systemctl", "is-system-running", "--wait"], BOOT_TIMEOUT);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            state == "running" || state == "degraded",
            "the container's systemd is {state:?} after boot:\n{}\n{}",
            self.sh("systemctl --failed --no-pager; true").stdout_text(),
            self.console_log()
        );
    }

    /// The container's PID 1 (as the host sees it): the process in the payload
    /// cgroup whose innermost PID is 1.
    fn find_leader(&self) -> Option<u32> {
        for hierarchy in ["unified", "systemd"] {
            for sub in ["payload", "payload/init.scope"] {
                let procs = cgroup_dir(hierarchy, &self.name)
                    .join(sub)
                    .join("cgroup.procs");
                let Ok(text) = fs::read_to_string(&procs) else {
                    continue;
                };
                for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let status =
                        fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let innermost_is_1 = status
                        .lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|ids| ids.split_whitespace().last())
                        == Some("1");
                    if innermost_is_1 {
                        return Some(pid);
                    }
                }
            }
        }
        None
    }

    /// The container's PID 1 as the host sees it.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// What systemd-nspawn printed (the container's console).
    pub fn console_log(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The host path of `path` inside the container (through its PID 1's root).
    pub fn host_path(&self, path: &str) -> PathBuf {
        let relative = path
            .strip_prefix('/')
            .expect("container paths are absolute");
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(relative)
    }

    /// Writes a file inside the running container.
    pub fn write_file(&self, path: &str, contents: impl AsRef<[u8]>, mode: u32) {
        let target = self.host_path(path);
        fs::write(&target, contents).unwrap_or_else(|e| panic!("write {}: {e}", target.display()));
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", target.display()));
    }

    /// The command that runs `args` in all of the container's namespaces with
    /// a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.leader.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-C",
        ])
        .args([
            "env",
            "-i",
            PATH,
            "LANG=C.UTF-8",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
        ])
        .args(args);
        cmd
    }

    /// Runs `args` in the container, bounded by `timeout`, whatever its exit status.
    pub fn run_within(&self, args: &[&str], timeout: Duration) -> Output {
        run_bounded(&mut self.command(args), timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `args` in the container; panics unless it exits 0.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.run_within(args, COMMAND_TIMEOUT);
        super::expect_success(&format!("{args:?} in the container"), out)
    }

    /// Runs a shell command line in the container, whatever its exit status.
    pub fn sh(&self, script: &str) -> Output {
        self.run_within(&["/bin/sh", "-c", script], COMMAND_TIMEOUT)
    }

    /// `systemctl show -P PROPERTY UNIT`.
    pub fn property(&self, unit: &str, property: &str) -> String {
        self.run(&["systemctl", "show", "-P", property, unit])
            .stdout_text()
            .trim()
            .to_owned()
    }

    /// `systemctl show -p P… UNIT`, read at one instant, as `(name, value)` pairs.
    pub fn properties(&self, unit: &str, names: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["systemctl", "show"];
        for name in names {
            args.extend(["-p", name]);
        }
        args.push(unit);
        let text = self.run(&args).stdout_text();
        names
            .iter()
            .map(|name| {
                let value = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .unwrap_or_default();
                ((*name).to_owned(), value.to_owned())
            })
            .collect()
    }

    /// `journalctl -u UNIT` with `extra` arguments (no pager, whole lines).
    pub fn journal(&self, unit: &str, extra: &[&str]) -> String {
        let mut args = vec!["journalctl", "--no-pager", "--no-hostname", "-u", unit];
        args.extend_from_slice(extra);
        self.run(&args).stdout_text()
    }

    /// Powers the container off and removes its cgroup (also done on drop).
    fn shut_down(&mut self) {
        if self.leader != 0 && self.nspawn.try_wait().ok().flatten().is_none() {
            // SIGRTMIN+4 to systemd: a clean poweroff; nspawn exits after its PID 1.
            let _ = Command::new("kill")
                .args(["-s", "RTMIN+4", &self.leader.to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + POWEROFF_TIMEOUT;
            while Instant::now() < deadline && self.nspawn.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let kill = cgroup_dir("unified", &self.name).join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = false;
            for hierarchy in ["unified", "systemd"] {
                let root = cgroup_dir(hierarchy, &self.name);
                if root.exists() {
                    remove_cgroup_tree(&root);
                    left |= root.exists();
                }
            }
            if !left || Instant::now() >= deadline {
                if left {
                    eprintln!(
                        "cgroup {} is still there after the container stopped",
                        self.name
                    );
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some((mut guard, stdin)) = self.guard.take() {
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && guard.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = guard.kill();
            let _ = guard.wait();
        }
        let _ = fs::remove_file(&self.console);
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn cgroup_dir(hierarchy: &str, name: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(hierarchy).join(name)
}

/// Removes a cgroup and its children, deepest first (cgroups are removed with rmdir).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// The text of a command's output.
pub trait OutputText {
    fn stdout_text(&self) -> String;
    fn stderr_text(&self) -> String;
}

impl OutputText for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

pub use super::run_blocking as run_bounded;
pub use super::wait::poll;

/// Waits up to `timeout` for `child` to exit.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Copies the unit files into `dir` with `ExecStart` pointing at the built
/// binary (systemd-analyze verify checks that it exists).
pub fn units_for_test(dir: &Path) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = std::fs::read_to_string(root.join("sqlgate.service")).expect("read service");
    assert!(service.contains("ExecStart=/usr/bin/sqlgate "));
    let service = service.replace(
        "ExecStart=/usr/bin/sqlgate ",
        &format!("ExecStart={SQLGATE} "),
    );
    let socket = std::fs::read_to_string(root.join("sqlgate.socket")).expect("read socket");
    let (s, k) = (dir.join("sqlgate.service"), dir.join("sqlgate.socket"));
    std::fs::write(&s, service).expect("write service");
    std::fs::write(&k, socket).expect("write socket");
    (s, k)
}
