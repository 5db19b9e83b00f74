//! The network guard (DESIGN.md section 4): which addresses the daemon may send to without
//! `--allow-private-network`, the check of a URL before a request, and the DNS resolver that
//! drops the other addresses so the address checked is the address connected to.
//!
//! # The classification
//!
//! An address is public when it is globally reachable unicast: the IANA IPv4 and IPv6
//! Special-Purpose Address Registries (RFC 6890 and its updates) list everything else.
//!
//! - IPv4: refused are `0.0.0.0/8`, `10.0.0.0/8`, `100.64.0.0/10` (shared, RFC 6598),
//!   `127.0.0.0/8`, `169.254.0.0/16` (link-local, with the cloud metadata address),
//!   `172.16.0.0/12`, `192.0.0.0/24` (IETF protocol assignments, RFC 6890), `192.0.2.0/24`,
//!   `198.51.100.0/24` and `203.0.113.0/24` (documentation, RFC 5737), `192.88.99.0/24` (the
//!   deprecated 6to4 relay anycast, RFC 7526), `192.168.0.0/16`, `198.18.0.0/15` (benchmarking,
//!   RFC 2544), `224.0.0.0/4` (multicast) and `240.0.0.0/4` (reserved, with the broadcast
//!   address).
//! - IPv6: public only inside `2000::/3`, the global unicast space (RFC 4291 section 2.4), and
//!   outside its special blocks: `2001::/23` (IETF protocol assignments, RFC 2928, with Teredo
//!   `2001::/32`, RFC 4380, whose tunnels end at an IPv4 address of the client's choosing),
//!   `2001:db8::/32` and `3fff::/20` (documentation, RFC 3849 and RFC 9637). Everything outside
//!   `2000::/3` is refused: the unspecified and loopback addresses, the discard prefix `100::/64`
//!   (RFC 6666), the local-use NAT64 prefix `64:ff9b:1::/48` (RFC 8215), SRv6 `5f00::/16`
//!   (RFC 9602), unique local `fc00::/7` (RFC 4193), link-local `fe80::/10`, the deprecated
//!   site-local `fec0::/10` (RFC 3879), multicast `ff00::/8`, and whatever is not yet assigned.
//! - IPv6 forms that carry an IPv4 address are as public as that address, so that
//!   `[::ffff:127.0.0.1]` is no way around the IPv4 rules: IPv4-mapped `::ffff:0:0/96` (RFC 4291
//!   section 2.5.5.2), IPv4-translated `::ffff:0:0:0/96` (SIIT, RFC 6145 section 2.1), the NAT64
//!   well-known prefix `64:ff9b::/96` (RFC 6052 section 2.1) and 6to4 `2002::/16` (RFC 3056
//!   section 2, the address in bits 16 to 47). The deprecated IPv4-compatible form `::/96` (RFC
//!   4291 section 2.5.5.1) is refused whatever it carries: no host is reached that way.
//!
//! No maintained crate does this: `Ipv6Addr::is_global` is unstable and, following the
//! registry, counts `64:ff9b::/96` and `2002::/16` as global without looking inside them.
//!
//! # Where it is applied
//!
//! [`check_url`] runs before every request to a custom touchpoint: it checks an IP literal in
//! the URL (which the HTTP client connects to without asking a resolver) and every address a name
//! resolves to. The client's resolver is [`PublicOnly`], which drops non-public addresses, so a
//! name cannot resolve to a public address for the check and to a private one for the request.
//! Redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a URL is not sent to.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The URL does not parse.
    #[error("bad url: {0}; fix the touchpoint's `url`")]
    BadUrl(#[from] url::ParseError),
    /// The URL has no host to connect to.
    #[error("the url has no host; fix the touchpoint's `url`")]
    NoHost,
    /// The host is, or resolves to, an address that is not public.
    #[error(
        "refused: {host} resolves to {ip}, a loopback, private or link-local address or another that is not public; the daemon sends there only when started with --allow-private-network"
    )]
    NotPublic {
        /// The URL's host.
        host: String,
        /// The first non-public address.
        ip: IpAddr,
    },
}

/// The HTTP client every channel request goes through: no redirects followed (recipients' data
/// must not follow one), and, unless `allow_private`, a resolver that refuses non-public
/// addresses. `idle_per_host` connections are kept open per host.
pub fn client_with(allow_private: bool, idle_per_host: usize) -> Result<reqwest::Client, String> {
    // One process-wide TLS provider; an earlier install (by an embedding program) is fine too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("touchctl/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(idle_per_host);
    if !allow_private {
        client = client.dns_resolver(PublicOnly);
    }
    client.build().map_err(|e| e.to_string())
}

/// Checks that `url` leads only to public addresses: its IP literal, or every address its name
/// resolves to. A name that does not resolve passes: the request then fails, and is retried, as
/// any other network error.
pub async fn check_url(url: &str) -> Result<(), Refused> {
    let parsed = url::Url::parse(url)?;
    let addrs: Vec<IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(name)) => {
            let port = parsed.port_or_known_default().unwrap_or(443);
            match tokio::net::lookup_host((name, port)).await {
                Ok(found) => found.map(|a| a.ip()).collect(),
                Err(_) => return Ok(()),
            }
        }
        None => return Err(Refused::NoHost),
    };
    match addrs.into_iter().find(|ip| !is_public(ip)) {
        Some(ip) => Err(Refused::NotPublic {
            host: parsed.host_str().unwrap_or_default().to_string(),
            ip,
        }),
        None => Ok(()),
    }
}

/// A DNS resolver that drops non-public addresses, so the address checked is the address
/// connected to.
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<std::net::SocketAddr> =
                all.into_iter().filter(|a| is_public(&a.ip())).collect();
            if public.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = format!(
                    "{host} resolves only to loopback, private, link-local or other addresses that are not public; the daemon sends there only when started with --allow-private-network"
                )
                .into();
                return Err(err);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether an address is globally reachable unicast (see the module docs for every range).
pub fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(*v4),
        IpAddr::V6(v6) => is_public_v6(*v6),
    }
}

/// The IPv4 blocks that are not globally reachable unicast: `(network, prefix length)`.
const NOT_PUBLIC_V4: [(u32, u32); 16] = [
    (0x0000_0000, 8),  // 0.0.0.0/8, "this network" (RFC 791)
    (0x0a00_0000, 8),  // 10.0.0.0/8, private (RFC 1918)
    (0x6440_0000, 10), // 100.64.0.0/10, shared address space (RFC 6598)
    (0x7f00_0000, 8),  // 127.0.0.0/8, loopback (RFC 1122)
    (0xa9fe_0000, 16), // 169.254.0.0/16, link-local (RFC 3927)
    (0xac10_0000, 12), // 172.16.0.0/12, private (RFC 1918)
    (0xc000_0000, 24), // 192.0.0.0/24, IETF protocol assignments (RFC 6890)
    (0xc000_0200, 24), // 192.0.2.0/24, documentation (RFC 5737)
    (0xc058_6300, 24), // 192.88.99.0/24, 6to4 relay anycast (RFC 7526)
    (0xc0a8_0000, 16), // 192.168.0.0/16, private (RFC 1918)
    (0xc612_0000, 15), // 198.18.0.0/15, benchmarking (RFC 2544)
    (0xc633_6400, 24), // 198.51.100.0/24, documentation (RFC 5737)
    (0xcb00_7100, 24), // 203.0.113.0/24, documentation (RFC 5737)
    (0xe000_0000, 4),  // 224.0.0.0/4, multicast (RFC 5771)
    (0xf000_0000, 4),  // 240.0.0.0/4, reserved (RFC 1112), with 255.255.255.255
    (0xffff_ffff, 32), // broadcast (RFC 919), listed for the reader: inside 240.0.0.0/4
];

/// Special blocks inside the global unicast space `2000::/3` that are not public.
const NOT_PUBLIC_V6: [(u128, u32); 3] = [
    (0x2001_0000 << 96, 23), // 2001::/23, IETF protocol assignments, Teredo (RFC 2928, 4380)
    (0x2001_0db8 << 96, 32), // 2001:db8::/32, documentation (RFC 3849)
    (0x3fff_0000_u128 << 96, 20), // 3fff::/20, documentation (RFC 9637)
];

fn within(addr: u128, net: u128, len: u32, bits: u32) -> bool {
    let mask = if len == 0 {
        0
    } else {
        (!0u128 << (bits - len)) & (!0u128 >> (128 - bits))
    };
    addr & mask == net & mask
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let addr = u128::from(u32::from(ip));
    !NOT_PUBLIC_V4
        .iter()
        .any(|&(net, len)| within(addr, u128::from(net), len, 32))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let addr = u128::from(ip);
    // The global unicast space, 2000::/3; the forms handled above sit outside it but for 6to4.
    within(addr, 0x2000 << 112, 3, 128)
        && !NOT_PUBLIC_V6
            .iter()
            .any(|&(net, len)| within(addr, net, len, 128))
}

/// The IPv4 address an IPv6 address stands for, in the forms that carry one to an IPv4 host
/// (IPv4-mapped, IPv4-translated, NAT64 well-known prefix, 6to4). The deprecated
/// IPv4-compatible form is left out: it is refused, as everything in `::/8` is.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let addr = u128::from(ip);
    if CARRY_LOW_32
        .iter()
        .any(|&(net, len)| within(addr, net, len, 128))
    {
        return Some(Ipv4Addr::from((addr & 0xffff_ffff) as u32));
    }
    if within(addr, 0x2002 << 112, 16, 128) {
        // 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
        return Some(Ipv4Addr::from(((addr >> 80) & 0xffff_ffff) as u32));
    }
    None
}

/// The prefixes whose last 32 bits are an IPv4 address.
const CARRY_LOW_32: [(u128, u32); 3] = [
    (0xffff << 32, 96),      // ::ffff:0:0/96, IPv4-mapped (RFC 4291)
    (0xffff << 48, 96),      // ::ffff:0:0:0/96, IPv4-translated (RFC 6145)
    (0x0064_ff9b << 96, 96), // 64:ff9b::/96, NAT64 well-known prefix (RFC 6052)
];

#[cfg(test)]
mod tests {
    use super::*;

    fn public(text: &str) -> bool {
        is_public(&text.parse().unwrap_or_else(|e| panic!("{text}: {e}")))
    }

    /// Fails naming every address of `cases` (address, what it is) that passes the check.
    #[track_caller]
    fn assert_refused(cases: &[(&str, &str)]) {
        let passed: Vec<String> = cases
            .iter()
            .filter(|(ip, _)| public(ip))
            .map(|(ip, what)| format!("{ip} ({what})"))
            .collect();
        assert!(passed.is_empty(), "passed the check: {passed:?}");
    }

    /// The IPv6 forms that passed the check though they lead to a loopback, private or otherwise
    /// non-public IPv4 host, as a URL's host or a resolver's answer gives them.
    #[test]
    fn ipv6_forms_of_private_addresses_are_refused() {
        assert_refused(&[
            ("::127.0.0.1", "IPv4-compatible loopback"),
            ("::10.0.0.1", "IPv4-compatible private"),
            (
                "::8.8.8.8",
                "IPv4-compatible, deprecated whatever it carries",
            ),
            ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
            ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
            ("::ffff:0:127.0.0.1", "IPv4-translated loopback"),
            ("::ffff:0:192.168.1.1", "IPv4-translated private"),
            ("64:ff9b::127.0.0.1", "NAT64 loopback"),
            ("64:ff9b::10.1.2.3", "NAT64 private"),
            ("64:ff9b::a9fe:a9fe", "NAT64 metadata"),
            ("64:ff9b:1::8.8.8.8", "local-use NAT64 (RFC 8215)"),
            ("2002:7f00:1::", "6to4 of 127.0.0.1"),
            ("2002:c0a8:101::1", "6to4 of 192.168.1.1"),
            ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ]);
    }

    #[test]
    fn special_ipv6_ranges_are_refused() {
        assert_refused(&[
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("100::1", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation (RFC 9637)"),
            ("2001:2::1", "benchmarking, in 2001::/23"),
            ("2001:10::1", "ORCHID, in 2001::/23"),
            ("5f00::1", "SRv6 SIDs"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("4000::1", "unassigned"),
            ("1::1", "unassigned"),
        ]);
    }

    #[test]
    fn special_ipv4_ranges_are_refused() {
        assert_refused(&[
            ("0.0.0.0", "this network"),
            ("0.1.2.3", "this network"),
            ("10.1.2.3", "private"),
            ("100.64.0.1", "shared"),
            ("100.127.255.254", "shared"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.16.5.4", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay anycast"),
            ("192.168.0.1", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
        ]);
    }

    #[test]
    fn public_addresses_pass_in_every_form() {
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.254",
            "2606:2800:220:1::1",
            "2a00:1450:4001:81b::200e",
            "2001:200::1",
            "3ffe::1",
            "::ffff:93.184.216.34",
            "::ffff:0:93.184.216.34",
            "64:ff9b::93.184.216.34",
            "2002:5db8:d822::1",
        ] {
            assert!(public(ip), "{ip} is public");
        }
    }

    #[test]
    fn embedded_addresses_are_read_from_the_right_bits() {
        let v4 = |s: &str| embedded_v4(s.parse().unwrap());
        assert_eq!(v4("::ffff:1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v4("::ffff:0:1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v4("64:ff9b::1.2.3.4"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v4("2002:102:304:5::6"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(v4("::1.2.3.4"), None);
        assert_eq!(v4("2001:db8::1.2.3.4"), None);
    }

    #[test]
    fn ip_literals_in_urls_are_checked_without_a_resolver() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for url in [
            "http://[::127.0.0.1]:8080/hook",
            "https://[::ffff:0:127.0.0.1]/hook",
            "https://[64:ff9b::127.0.0.1]/hook",
            "https://[2002:7f00:1::]/hook",
            "https://[::ffff:7f00:1]/hook",
            "https://0x7f.1/hook",
            "https://169.254.169.254/latest/meta-data",
        ] {
            let err = rt.block_on(check_url(url)).unwrap_err();
            assert!(matches!(err, Refused::NotPublic { .. }), "{url}: {err}");
            assert!(err.to_string().contains("--allow-private-network"), "{err}");
        }
        rt.block_on(check_url("https://[2606:2800:220:1::1]/hook"))
            .unwrap();
        rt.block_on(check_url("https://93.184.216.34/hook"))
            .unwrap();
        assert!(matches!(
            rt.block_on(check_url("not a url")),
            Err(Refused::BadUrl(_))
        ));
    }

    #[test]
    fn the_resolver_drops_private_addresses() {
        use reqwest::dns::Resolve;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = rt.block_on(PublicOnly.resolve(name)).err().unwrap();
        assert!(err.to_string().contains("--allow-private-network"), "{err}");
    }
}
