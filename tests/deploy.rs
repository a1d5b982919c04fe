//! The files in deploy/ are checked, not just written: each checker that knows the format runs on
//! the committed files (`systemd-analyze verify` and `security` on the units,
//! `kubernetes-validate --strict` on the manifests), and a test of our own reads them and checks
//! the numbers that must agree with each other and with `echo`'s flags: a stop timeout above drain
//! delay + shutdown timeout, probes on the metrics port, a socket on loopback.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

const SOCKET_UNIT: &str = "taskserve-echo.socket";
const SERVICE_UNIT: &str = "taskserve-echo.service";
/// Where the service's ExecStart expects the program, as
/// `cargo install --path . --bin taskserve-echo --root /usr/local` puts it.
const INSTALLED: &str = "/usr/local/bin/taskserve-echo";
/// The Kubernetes versions whose API schemas the manifests must pass: the oldest we claim, and
/// the newest that the kubernetes-validate .ci/run installs ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

// ---------------------------------------------------------------------------------------------
// systemd units

/// A unit file's keys by section, each key with its values in order (a key may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Parses a unit file as systemd.syntax(7) describes it: sections, `Key=value`, comments that
/// start a line with `#` or `;`, and lines continued by a trailing backslash.
fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = None;
    let mut logical = String::new();
    for line in text.lines() {
        let line = line.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let entry = std::mem::take(&mut logical);
        if let Some(name) = entry.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = Some(name.to_string());
            continue;
        }
        let (key, value) = entry
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=value: {entry:?}"));
        let section = section.clone().expect("a key before any [Section]");
        unit.entry(section)
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

/// The one value of `key` in `section`: the test wants each key it reads set exactly once.
fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let values = unit
        .get(section)
        .and_then(|keys| keys.get(key))
        .unwrap_or_else(|| panic!("no {key}= in [{section}]"));
    assert_eq!(values.len(), 1, "{key}= set more than once in [{section}]");
    &values[0]
}

/// A systemd time span in whole seconds: `20`, `20s`, `1min 30s` (systemd.time(7); the units a
/// stop timeout uses).
fn seconds(span: &str) -> u64 {
    let mut total = 0;
    for part in span.split_whitespace() {
        let digits = part.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let number: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("not a time span: {span:?}"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" | "second" | "seconds" => number,
            "m" | "min" | "minute" | "minutes" => number * 60,
            unit => panic!("time unit {unit:?} in {span:?}: use seconds or minutes"),
        };
    }
    total
}

/// The value of `--flag VALUE` (or `--flag=VALUE`) in `args`, if it is there.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut found = None;
    for (i, arg) in args.iter().enumerate() {
        if arg == name {
            let value = args
                .get(i + 1)
                .unwrap_or_else(|| panic!("{name} without a value"));
            assert!(found.is_none(), "{name} given twice");
            found = Some(value.as_str());
        } else if let Some(value) = arg.strip_prefix(name).and_then(|s| s.strip_prefix('=')) {
            assert!(found.is_none(), "{name} given twice");
            found = Some(value);
        }
    }
    found
}

/// Seconds from SIGTERM to exit that `echo`'s flags allow: the drain delay (default 0), then the
/// shutdown timeout (default 10, as `echo --help` says).
fn stop_seconds(args: &[String]) -> u64 {
    let drain: u64 = flag(args, "--drain-delay").unwrap_or("0").parse().unwrap();
    let shutdown: u64 = flag(args, "--shutdown-timeout")
        .unwrap_or("10")
        .parse()
        .unwrap();
    drain + shutdown
}

/// The service's ExecStart: the program, then its arguments.
fn exec_start(service: &Unit) -> (String, Vec<String>) {
    let line = one(service, "Service", "ExecStart");
    let mut words = line.split_whitespace().map(String::from);
    let program = words.next().expect("a program in ExecStart");
    (program, words.collect())
}

#[test]
fn systemd_units_agree_with_echo_and_each_other() {
    let socket = parse_unit(&read("deploy/systemd/taskserve-echo.socket"));
    let service = parse_unit(&read("deploy/systemd/taskserve-echo.service"));

    // The socket serves this machine only, as echo does by default: opening it wider is a
    // decision (the unit's comment says how), not something a copied file does.
    let listens = &socket["Socket"]["ListenStream"];
    assert!(!listens.is_empty(), "the socket listens somewhere");
    for listen in listens {
        let addr: std::net::SocketAddr = listen
            .parse()
            .unwrap_or_else(|_| panic!("ListenStream={listen} is not an address and port"));
        assert!(
            addr.ip().is_loopback(),
            "ListenStream={listen} is not loopback"
        );
    }

    let (program, args) = exec_start(&service);
    assert_eq!(program, INSTALLED, "ExecStart runs the installed program");
    assert_eq!(one(&service, "Service", "Type"), "notify");
    assert_eq!(one(&service, "Service", "KillSignal"), "SIGTERM");
    let stop = stop_seconds(&args);
    let timeout = seconds(one(&service, "Service", "TimeoutStopSec"));
    assert!(
        timeout > stop,
        "TimeoutStopSec={timeout} must be above drain delay + shutdown timeout = {stop} s, or \
         systemd kills echo before it has drained"
    );
    assert!(
        flag(&args, "--metrics").is_some(),
        "--metrics: /readyz and /healthz for a balancer, and the metrics"
    );
    // The unit and its socket go together.
    assert_eq!(one(&service, "Unit", "Requires"), SOCKET_UNIT);

    // The sandboxing, key by key: several of these do not move `systemd-analyze security`'s
    // score (DynamicUser=yes implies them), so that test would not see one go.
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(one(&service, "Service", key), value, "{key}=");
    }
    let files: u64 = one(&service, "Service", "LimitNOFILE").parse().unwrap();
    let connections: u64 = flag(&args, "--max-connections")
        .unwrap_or("10000")
        .parse()
        .unwrap();
    assert!(
        files > connections,
        "LimitNOFILE={files} leaves no room for --max-connections {connections}"
    );
}

/// A root for `systemd-analyze --root`: the committed units, byte for byte, in
/// /etc/systemd/system; the program built by this `cargo test` where ExecStart expects the
/// installed one; and this machine's own units (sockets.target, sysinit.target... that ours
/// depend on). The units are checked as they are installed, with nothing rewritten.
/// `name` tells apart the roots of tests that run at once.
fn systemd_root(name: &str) -> PathBuf {
    let tree = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tree);
    let units = tree.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for unit in [SOCKET_UNIT, SERVICE_UNIT] {
        let committed = root().join("deploy/systemd").join(unit);
        std::fs::copy(committed, units.join(unit)).unwrap();
    }
    let bin = tree.join(INSTALLED.trim_start_matches('/'));
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let built = env!("CARGO_BIN_EXE_taskserve-echo");
    // target/tmp is beside the binary: a link, not a copy of tens of megabytes, where it can.
    if std::fs::hard_link(built, &bin).is_err() {
        std::fs::copy(built, &bin).unwrap();
    }
    let system = tree.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    let host = Path::new("/usr/lib/systemd/system");
    for entry in std::fs::read_dir(host).expect("this machine's systemd units") {
        let entry = entry.unwrap();
        let target = system.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target).unwrap();
        }
        // Directories (*.wants/, *.d/) are left out: no unit ours need is in one.
    }
    tree
}

/// Runs `systemd-analyze ARGS`; returns whether it succeeded and its stdout and stderr.
fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("this test needs systemd-analyze (Debian's systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
#[ignore = "needs systemd-analyze: bash .ci/run installs it"]
fn systemd_analyze_verify_passes_the_committed_units() {
    let root = systemd_root("verify");
    let root_arg = format!("--root={}", root.display());
    let (ok, text) = systemd_analyze(&["verify", &root_arg, SOCKET_UNIT, SERVICE_UNIT]);
    let _ = std::fs::remove_dir_all(&root);
    // verify exits 0 after a misspelt key or a value it cannot parse: it ignores the line, as
    // systemd itself would, and prints why. Any line about our units is a failure. (Lines about
    // this machine's own units are its business.)
    let ours: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("taskserve-echo"))
        .collect();
    assert!(
        ok && ours.is_empty(),
        "systemd-analyze verify finds fault with deploy/systemd:\n{text}"
    );
    if !text.is_empty() {
        eprintln!("systemd-analyze verify, about this machine's units:\n{text}");
    }
}

#[test]
#[ignore = "needs systemd-analyze: bash .ci/run installs it"]
fn systemd_analyze_security_rates_the_service_well_sandboxed() {
    let root = systemd_root("security");
    let root_arg = format!("--root={}", root.display());
    // Exposure from 0 (locked down) to 10 (none of the sandboxing); --threshold is in tenths.
    // The unit scores 1.4 under systemd 252: what is left is the network it serves, reading
    // the clock, non-process /proc files and IP address lists. 1.5 leaves room for a rounding
    // of a later systemd, and fails when DynamicUser, the system call filter, the capability
    // bounding set, RestrictNamespaces, PrivateDevices or RestrictAddressFamilies goes (the
    // other keys: systemd_units_agree_with_echo_and_each_other).
    let (ok, text) = systemd_analyze(&[
        "security",
        "--offline=yes",
        &root_arg,
        "--threshold=15",
        "--no-pager",
        SERVICE_UNIT,
    ]);
    let _ = std::fs::remove_dir_all(&root);
    let overall = text
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    eprintln!("{overall}");
    assert!(
        ok,
        "{SERVICE_UNIT} is exposed above 1.5; systemd-analyze security says:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

/// The subset of YAML the manifests are written in: block mappings and sequences by
/// indentation, plain and quoted scalars, comments. Enough to read them back; the schemas are
/// kubernetes-validate's business.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Map(Vec<(String, Yaml)>),
    List(Vec<Yaml>),
    Scalar(String),
}

impl Yaml {
    fn parse(text: &str) -> Yaml {
        let mut lines: Vec<(usize, String)> = text
            .lines()
            .map(strip_comment)
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                assert!(!line.contains('\t'), "a tab in YAML: {line:?}");
                assert_ne!(line.trim(), "---", "one document a file");
                let indent = line.len() - line.trim_start().len();
                (indent, line.trim().to_string())
            })
            .collect();
        let mut at = 0;
        let yaml = Yaml::block(&mut lines, &mut at, 0);
        assert_eq!(at, lines.len(), "unparsed YAML from {:?}", lines.get(at));
        yaml
    }

    /// The block whose lines start at `indent`, from `lines[*at]` on.
    fn block(lines: &mut [(usize, String)], at: &mut usize, indent: usize) -> Yaml {
        if lines[*at].1.starts_with("- ") || lines[*at].1 == "-" {
            let mut items = Vec::new();
            while *at < lines.len() && lines[*at].0 == indent && lines[*at].1.starts_with('-') {
                let rest = lines[*at].1[1..].trim_start().to_string();
                if rest.is_empty() {
                    *at += 1;
                    let child = lines[*at].0;
                    items.push(Yaml::block(lines, at, child));
                } else if rest.contains(": ") || rest.ends_with(':') {
                    // `- key: value` opens a mapping whose keys line up with `key`.
                    lines[*at] = (indent + 2, rest);
                    items.push(Yaml::block(lines, at, indent + 2));
                } else {
                    items.push(Yaml::Scalar(unquote(&rest)));
                    *at += 1;
                }
            }
            Yaml::List(items)
        } else {
            let mut entries = Vec::new();
            while *at < lines.len() && lines[*at].0 == indent {
                let line = lines[*at].1.clone();
                let (key, value) = match line.split_once(": ") {
                    Some((key, value)) => (key, value.trim()),
                    None => (
                        line.strip_suffix(':')
                            .unwrap_or_else(|| panic!("not `key: value`: {line:?}")),
                        "",
                    ),
                };
                *at += 1;
                let value = if !value.is_empty() {
                    Yaml::Scalar(unquote(value))
                } else {
                    let child = lines.get(*at).map(|(i, _)| *i).unwrap_or(0);
                    assert!(child > indent, "`{key}:` with nothing under it");
                    Yaml::block(lines, at, child)
                };
                assert!(
                    entries.iter().all(|(k, _)| k != key),
                    "key {key:?} twice in one mapping"
                );
                entries.push((key.to_string(), value));
            }
            Yaml::Map(entries)
        }
    }

    /// The value at `path`, keys separated by dots: `spec.template.spec`.
    fn at(&self, path: &str) -> &Yaml {
        path.split('.').fold(self, |node, key| match node {
            Yaml::Map(entries) => entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no {key:?} in {path}")),
            _ => panic!("{path}: {key:?} is not in a mapping"),
        })
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Scalar(s) => s,
            other => panic!("not a scalar: {other:?}"),
        }
    }

    fn u64(&self) -> u64 {
        self.str()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {self:?}"))
    }

    fn list(&self) -> &[Yaml] {
        match self {
            Yaml::List(items) => items,
            other => panic!("not a list: {other:?}"),
        }
    }
}

/// `line` without a comment: `#` at its start or after a space, outside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if previous == ' ' => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

fn unquote(value: &str) -> String {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner.to_string();
        }
    }
    value.to_string()
}

fn manifest(name: &str) -> Yaml {
    Yaml::parse(&read(&format!("deploy/kubernetes/{name}")))
}

/// The port of a probe or a Service's targetPort: a number, or the name of a container port.
fn resolve_port(port: &Yaml, container: &Yaml) -> u64 {
    match port.str().parse() {
        Ok(number) => number,
        Err(_) => container
            .at("ports")
            .list()
            .iter()
            .find(|p| p.at("name").str() == port.str())
            .unwrap_or_else(|| panic!("no container port named {:?}", port.str()))
            .at("containerPort")
            .u64(),
    }
}

/// The port of a `host:port` flag value.
fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not host:port"))
}

#[test]
fn kubernetes_manifests_agree_with_echo_and_each_other() {
    let deployment = manifest("deployment.yaml");
    let service = manifest("service.yaml");
    let budget = manifest("poddisruptionbudget.yaml");
    assert_eq!(deployment.at("kind").str(), "Deployment");
    assert_eq!(service.at("kind").str(), "Service");
    assert_eq!(budget.at("kind").str(), "PodDisruptionBudget");

    let pod = deployment.at("spec.template.spec");
    let containers = pod.at("containers").list();
    assert_eq!(containers.len(), 1, "one container, echo");
    let echo = &containers[0];
    let args: Vec<String> = echo
        .at("args")
        .list()
        .iter()
        .map(|a| a.str().to_string())
        .collect();

    // The kubelet kills the pod once the grace period is over: echo must have drained by then.
    let stop = stop_seconds(&args);
    let grace = pod.at("terminationGracePeriodSeconds").u64();
    assert!(
        grace > stop,
        "terminationGracePeriodSeconds {grace} must be above drain delay + shutdown timeout = \
         {stop} s, or the kubelet kills echo before it has drained"
    );
    assert!(
        flag(&args, "--drain-delay").is_some_and(|d| d != "0"),
        "a drain delay: kube-proxy goes on sending clients for a while after SIGTERM"
    );

    // echo must listen where the Service and the probes reach it.
    assert_eq!(flag(&args, "--host"), Some("0.0.0.0"), "the pod's address");
    let metrics = port_of(flag(&args, "--metrics").expect("--metrics, for the probes"));
    let port: u64 = flag(&args, "--port").unwrap_or("25000").parse().unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = echo.at(probe).at("httpGet");
        assert_eq!(get.at("path").str(), path, "{probe}'s path");
        assert_eq!(
            resolve_port(get.at("port"), echo),
            metrics,
            "{probe} must ask the --metrics port"
        );
    }
    let target = service.at("spec.ports").list();
    assert_eq!(target.len(), 1, "the Service forwards the echo port");
    assert_eq!(resolve_port(target[0].at("targetPort"), echo), port);
    let declared: Vec<u64> = echo
        .at("ports")
        .list()
        .iter()
        .map(|p| p.at("containerPort").u64())
        .collect();
    assert!(
        declared.contains(&port) && declared.contains(&metrics),
        "containerPorts {declared:?} name --port {port} and the --metrics port {metrics}"
    );

    // One set of labels: the Deployment's selector, its pods, the Service and the budget.
    let labels = deployment.at("spec.template.metadata.labels");
    assert_eq!(deployment.at("spec.selector.matchLabels"), labels);
    assert_eq!(service.at("spec.selector"), labels);
    assert_eq!(budget.at("spec.selector.matchLabels"), labels);

    // A rolling update and an eviction never leave no pod serving.
    let replicas = deployment.at("spec.replicas").u64();
    assert!(
        replicas >= 2,
        "{replicas} replicas: one must serve while another stops"
    );
    assert_eq!(
        deployment
            .at("spec.strategy.rollingUpdate.maxUnavailable")
            .str(),
        "0"
    );
    let min_available = budget.at("spec.minAvailable").u64();
    assert!((1..replicas).contains(&min_available));

    // The hardening that is easy to lose in an edit.
    assert_eq!(pod.at("securityContext.runAsNonRoot").str(), "true");
    assert_eq!(
        pod.at("securityContext.seccompProfile.type").str(),
        "RuntimeDefault"
    );
    let security = echo.at("securityContext");
    assert_eq!(security.at("allowPrivilegeEscalation").str(), "false");
    assert_eq!(security.at("readOnlyRootFilesystem").str(), "true");
    assert_eq!(
        security.at("capabilities.drop"),
        &Yaml::List(vec![Yaml::Scalar("ALL".into())])
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            echo.at("resources").at(kind).at(resource).str();
        }
    }
}

#[test]
#[ignore = "needs kubernetes-validate: bash .ci/run installs it (pip)"]
fn kubernetes_validate_passes_the_committed_manifests_strictly() {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "deployment, service and budget: {files:?}");
    for version in KUBERNETES_VERSIONS {
        let output = Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("this test needs kubernetes-validate (pip install kubernetes-validate)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // It exits 0 with only a warning for a resource it has no schema for (a misspelt
        // apiVersion or kind): each file must have passed, by name.
        let passed = text
            .lines()
            .filter(|line| line.starts_with("INFO") && line.contains(" passed for resource "))
            .count();
        assert!(
            output.status.success() && passed == files.len() && !text.contains("WARN"),
            "kubernetes-validate --strict against Kubernetes {version}:\n{text}"
        );
    }
}

#[test]
fn every_flag_in_deploy_is_one_echo_knows() {
    let help = Command::new(env!("CARGO_BIN_EXE_echo"))
        .arg("--help")
        .output()
        .expect("run echo --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let (_, unit_args) = exec_start(&parse_unit(&read("deploy/systemd/taskserve-echo.service")));
    let pod_args: Vec<String> = manifest("deployment.yaml")
        .at("spec.template.spec.containers")
        .list()[0]
        .at("args")
        .list()
        .iter()
        .map(|a| a.str().to_string())
        .collect();
    for arg in unit_args.iter().chain(&pod_args) {
        if let Some(name) = arg.strip_prefix("--") {
            let name = name.split('=').next().unwrap();
            assert!(
                help.contains(&format!("--{name} ")) || help.contains(&format!("--{name}\n")),
                "--{name} in deploy/ is not a flag of echo --help:\n{help}"
            );
        }
    }
}
