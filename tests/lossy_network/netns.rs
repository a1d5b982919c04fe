//! The namespace's network: its loopback, and the faults injected into it with nftables and tc.

use std::net::SocketAddr;

use super::common::programs::run_to_success;
use super::common::PATIENCE;
use super::Scenario;

/// The loopback as every scenario has it: a real link's MTU, and one segment per packet (no
/// 64 KiB GSO super-packets), so that a rule that drops 2 % of packets drops 2 % of segments.
pub const LINK: &str = "ip link set lo up mtu 1500 gso_max_segs 1";

/// Where a scenario's qdisc goes: every packet lo delivers is redirected, on its way in,
/// through ifb0, whose root qdisc shapes (and drops) it. Not on lo's way out: there a full
/// queue's drop is reported to the sending socket, and TCP takes it as local congestion, which
/// no router's drop tells it. A SYN-ACK whose retransmission fails so ends the half-open
/// connection, and the client's ACK is then answered with a reset: 81 of 250 clients were reset
/// so at 1 Mbit/s, and a real slow link resets none.
const BOTTLENECK: &[&str] = &[
    "ip link add ifb0 type ifb",
    "ip link set ifb0 up",
    "tc qdisc add dev lo handle ffff: ingress",
    "tc filter add dev lo parent ffff: protocol all u32 match u32 0 0 \
     action mirred egress redirect dev ifb0",
];

/// Runs `line`, a program and its arguments separated by spaces; prints it first, as the record
/// of what the scenario did. Panics with the program's error if it fails.
pub fn command_line(line: &str) {
    println!("{line}");
    let mut words = line.split_whitespace();
    let program = words.next().expect("a program");
    run_tool(program, &words.collect::<Vec<_>>(), None);
}

/// Runs `program` with `args` and `input` on its stdin; returns its stdout, or panics with its
/// stderr.
pub fn run_tool(program: &str, args: &[&str], input: Option<&str>) -> String {
    let input = input.unwrap_or("").as_bytes();
    let output = run_to_success(program, args, input, PATIENCE, "bash .ci/run installs it");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Adds `rules` to the input hook of the namespace's table `inet lossy` (made by the first
/// call): a packet they drop is lost after it left its sender, as on a wire. Prints the
/// ruleset, as the record of what was done.
pub fn nft_input_rules(rules: &[String]) {
    let rules: String = rules.iter().map(|rule| format!("\t\t{rule}\n")).collect();
    let ruleset = format!(
        "table inet lossy {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         {rules}\
         \t}}\n\
         }}\n"
    );
    println!("nft -f - <<'EOF'\n{ruleset}EOF");
    run_tool("nft", &["-f", "-"], Some(&ruleset));
}

/// Packets the rules of [`nft_input_rules`] dropped or reset so far, from their counters.
pub fn nft_hits() -> u64 {
    let table = run_tool("nft", &["list", "table", "inet", "lossy"], None);
    table
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The faults injected into the namespace's loopback.
pub struct Faults {
    nft: bool,
    qdisc: bool,
}

impl Faults {
    /// Adds `scenario`'s nftables rules, on the packets to and from the server's `ports` only
    /// (its clients' traffic, both ways), and its qdisc, on every packet (through [`BOTTLENECK`]).
    pub fn inject(scenario: &Scenario, addrs: &[SocketAddr]) -> Faults {
        if let Some(statement) = scenario.nft {
            let ports: Vec<String> = addrs.iter().map(|a| a.port().to_string()).collect();
            let ports = ports.join(", ");
            nft_input_rules(&[
                format!("tcp dport {{ {ports} }} {statement}"),
                format!("tcp sport {{ {ports} }} {statement}"),
            ]);
        }
        if let Some(qdisc) = scenario.qdisc {
            BOTTLENECK.iter().for_each(|line| command_line(line));
            command_line(&format!("tc qdisc add dev ifb0 root {qdisc}"));
        }
        Faults {
            nft: scenario.nft.is_some(),
            qdisc: scenario.qdisc.is_some(),
        }
    }

    /// Packets the nftables rules dropped or reset, from their counters.
    fn hit(&self) -> u64 {
        if self.nft {
            nft_hits()
        } else {
            0
        }
    }

    /// The qdisc's statistics line: `Sent N bytes M pkt (dropped D, overlimits O requeues R)`.
    fn qdisc_stats(&self) -> Option<String> {
        if !self.qdisc {
            return None;
        }
        let stats = run_tool("tc", &["-s", "qdisc", "show", "dev", "ifb0"], None);
        let line = stats
            .lines()
            .find(|line| line.trim_start().starts_with("Sent"));
        Some(line.expect("tc -s shows what was sent").trim().to_string())
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.nft {
            parts.push(format!("nft hit {} packets", self.hit()));
        }
        if let Some(stats) = self.qdisc_stats() {
            parts.push(format!("tbf: {stats}"));
        }
        parts.join(", ")
    }

    /// Panics unless the faults really hit the traffic: a rule that matched nothing (a wrong
    /// port) would make a clean run prove nothing.
    pub fn check(&self) {
        if self.nft {
            assert!(self.hit() > 0, "the nftables rules hit no packet");
        }
        if let Some(stats) = self.qdisc_stats() {
            assert!(stats.contains("overlimits") && !stats.contains("overlimits 0 "));
        }
    }
}
