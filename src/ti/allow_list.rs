//! `ti.allowed_hosts`: where TIs may be registered. Names match listed names (never
//! resolved: no DNS traffic, and no answer that depends on a resolver); addresses match
//! listed addresses and networks.

use std::net::IpAddr;

use ipnet::IpNet;

/// One entry of `ti.allowed_hosts`.
#[derive(Debug, Clone, PartialEq)]
enum HostRule {
    /// A host name, matched exactly (case-insensitive).
    Name(String),
    /// An address or network.
    Net(IpNet),
}

impl HostRule {
    /// Parses `name`, `address` or `address/prefix`.
    fn parse(rule: &str) -> Result<Self, String> {
        let rule = rule.trim();
        let bad = || format!("ti.allowed_hosts: '{rule}' is not a host name, address or network");
        if rule.contains('/') {
            return rule.parse::<IpNet>().map(Self::Net).map_err(|_| bad());
        }
        if let Ok(ip) = rule.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(ip)));
        }
        if rule.is_empty() {
            return Err(bad());
        }
        Ok(Self::Name(rule.to_ascii_lowercase()))
    }
}

/// The parsed allow-list; empty allows every host.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    rules: Vec<HostRule>,
}

impl AllowList {
    /// Parses the configured rules; the error names the first bad one.
    pub fn parse(rules: &[String]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .map(|r| HostRule::parse(r))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// True if the list is empty, or `host` is named by a rule, or is an address inside one.
    pub fn allows(&self, host: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => self
                .rules
                .iter()
                .any(|r| matches!(r, HostRule::Net(net) if net.contains(&ip))),
            Err(_) => {
                let name = host.to_ascii_lowercase();
                self.rules
                    .iter()
                    .any(|r| matches!(r, HostRule::Name(n) if *n == name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> Result<AllowList, String> {
        AllowList::parse(&rules.iter().map(|r| r.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn allow_list_matches_names_addresses_and_networks() {
        let rules = list(&["localhost", "10.1.0.0/16", "::1"]).unwrap();
        assert!(rules.allows("LOCALHOST"));
        assert!(rules.allows("10.1.200.3"));
        assert!(!rules.allows("10.2.0.1"));
        assert!(rules.allows("::1"));
        assert!(rules.allows("[::1]"));
        assert!(!rules.allows("127.0.0.2"));
        assert!(!rules.allows("example.com"), "names are not resolved");
        assert!(list(&["10.0.0.0/33"]).is_err());
        assert!(list(&[""]).is_err());
    }

    #[test]
    fn an_empty_allow_list_allows_every_host() {
        assert!(list(&[]).unwrap().allows("example.com"));
    }
}
