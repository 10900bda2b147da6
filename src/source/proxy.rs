//! The proxy used to reach the server, chosen from the environment the way curl chooses it.
//!
//! reqwest's own reading differs from curl's: it also reads `HTTP_PROXY` in upper case (curl does not:
//! "httpoxy", a CGI request header can set it), it prefers upper-case names over lower-case ones, and its
//! `NO_PROXY=*` does not match a server given as an IP address. The agent talks to one origin only (it
//! follows no redirect), so it decides once, with the rules below, and gives reqwest that proxy or none.
//!
//! - `http://` server: `http_proxy` (lower case only), then `all_proxy`, `ALL_PROXY`.
//! - `https://` server: `https_proxy`, `HTTPS_PROXY`, then `all_proxy`, `ALL_PROXY`.
//! - An empty variable counts as unset. A proxy without scheme is `http://`; only `http://` and
//!   `https://` proxies are supported (a `socks5://` one is a configuration error, not silently ignored).
//! - `no_proxy`, else `NO_PROXY`: `*` alone bypasses every host; otherwise a comma-separated list where a
//!   name matches that host and its subdomains (`example.com` and `.example.com` both match
//!   `www.example.com`, never `notexample.com`; case-insensitive, trailing dots ignored), and an IP address
//!   or CIDR block (`127.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8`, IPv6 without brackets) matches a server
//!   given as an IP address. Names are never resolved: `localhost` does not match `127.0.0.1`. An entry
//!   with a port (`host:8080`) matches nothing, as in curl.

use std::net::IpAddr;

use reqwest::Url;
use url::Host;

/// The proxy chosen for the server, and the variable it came from.
#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    pub url: Url,
    pub variable: &'static str,
}

/// A proxy variable that cannot be used. Never holds the variable's value (it may carry a password).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "${variable} is not a usable proxy ({problem}); expected http://[user:password@]host[:port], or \
     exclude the server with $NO_PROXY"
)]
pub struct ProxyError {
    pub variable: &'static str,
    pub problem: &'static str,
}

/// The proxy for `server`, reading variables through `env` (`None` = unset).
///
/// Errors: the chosen variable does not hold an `http://` or `https://` URL with a host.
pub fn choose(
    server: &Url,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Chosen>, ProxyError> {
    let get = |name: &'static str| env(name).filter(|v| !v.is_empty()).map(|v| (name, v));
    let names: &[&'static str] = match server.scheme() {
        "https" => &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"],
        _ => &["http_proxy", "all_proxy", "ALL_PROXY"],
    };
    let Some((variable, value)) = names.iter().find_map(|n| get(n)) else {
        return Ok(None);
    };
    let no_proxy = get("no_proxy")
        .or_else(|| get("NO_PROXY"))
        .map(|(_, v)| v)
        .unwrap_or_default();
    if server.host().is_some_and(|h| bypasses(&no_proxy, h)) {
        return Ok(None);
    }
    let err = |problem| ProxyError { variable, problem };
    let text = if value.contains("://") {
        value
    } else {
        format!("http://{value}")
    };
    let url = Url::parse(&text).map_err(|_| err("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(err("only http:// and https:// proxies are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(err("no host"));
    }
    Ok(Some(Chosen { url, variable }))
}

/// Whether the `NO_PROXY` list `list` excludes `host` from proxying (curl's rules, see the module doc).
pub fn bypasses(list: &str, host: Host<&str>) -> bool {
    if list.trim() == "*" {
        return true;
    }
    let entries = list.split(',').map(str::trim).filter(|e| !e.is_empty());
    match host {
        Host::Domain(name) => {
            let name = name.strip_suffix('.').unwrap_or(name);
            entries.into_iter().any(|entry| {
                let entry = entry.strip_suffix('.').unwrap_or(entry);
                let entry = entry.strip_prefix('.').unwrap_or(entry);
                !entry.is_empty()
                    && (name.eq_ignore_ascii_case(entry)
                        || name.len() > entry.len()
                            && name.as_bytes()[name.len() - entry.len() - 1] == b'.'
                            && name[name.len() - entry.len()..].eq_ignore_ascii_case(entry))
            })
        }
        Host::Ipv4(ip) => entries.into_iter().any(|e| in_block(e, IpAddr::V4(ip))),
        Host::Ipv6(ip) => entries.into_iter().any(|e| in_block(e, IpAddr::V6(ip))),
    }
}

/// `entry` is an address (`10.1.2.3`, `::1`, `[::1]`) equal to `ip`, or a CIDR block holding it.
fn in_block(entry: &str, ip: IpAddr) -> bool {
    let (addr, bits) = match entry.split_once('/') {
        Some((a, b)) => match b.parse::<u32>() {
            Ok(bits) => (a, Some(bits)),
            Err(_) => return false,
        },
        None => (entry, None),
    };
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, bits)
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(net.into(), ip.into(), 128, bits),
        _ => false,
    }
}

/// The first `bits` (all of `width` when `None`) of two addresses of `width` bits agree.
fn prefix_eq(net: u128, ip: u128, width: u32, bits: Option<u32>) -> bool {
    let bits = bits.unwrap_or(width);
    if bits > width {
        return false;
    }
    let shift = width - bits;
    shift >= width || (net >> shift) == (ip >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> Host<String> {
        Url::parse(&format!("http://{h}/"))
            .expect("url")
            .host()
            .expect("host")
            .to_owned()
    }

    fn bypass(list: &str, h: &str) -> bool {
        let h = host(h);
        let h = match &h {
            Host::Domain(d) => Host::Domain(d.as_str()),
            Host::Ipv4(ip) => Host::Ipv4(*ip),
            Host::Ipv6(ip) => Host::Ipv6(*ip),
        };
        bypasses(list, h)
    }

    #[test]
    fn no_proxy_follows_curls_rules() {
        // (list, host, bypassed): the examples of CURLOPT_NOPROXY and curl's noproxy.c.
        let cases = [
            ("*", "example.com", true),
            ("*", "127.0.0.1", true),
            ("*", "[::1]", true),
            (" * ", "10.1.2.3", true),
            ("", "example.com", false),
            ("ample.com", "ample.com", true),
            ("ample.com", "www.ample.com", true),
            ("ample.com", "www.example.com", false),
            ("ample.com", "ample.com.org", false),
            (".example.com", "www.example.com", true),
            (".example.com", "example.com", true),
            ("example.com.", "WWW.Example.COM", true),
            ("example.com", "example.com.", true),
            ("example.com", "notexample.com", false),
            ("example.com:8080", "example.com", false),
            ("*.example.com", "www.example.com", false),
            ("foo, bar ,example.com", "api.example.com", true),
            ("localhost", "127.0.0.1", false),
            ("localhost", "localhost", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("127.0.0.0/8", "127.9.8.7", true),
            ("127.0.0.0/8", "128.0.0.1", false),
            ("192.168.0.0/16", "192.168.77.1", true),
            ("10.0.0.0/33", "10.0.0.1", false),
            ("10.0.0.0/x", "10.0.0.0", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("127.0.0.1", "localhost", false),
            ("::1", "[::1]", true),
            ("[::1]", "[::1]", true),
            ("fd00::/8", "[fd12::1]", true),
            ("fd00::/8", "[fe80::1]", false),
            ("127.0.0.1", "[::1]", false),
            ("::1", "127.0.0.1", false),
        ];
        for (list, h, want) in cases {
            assert_eq!(bypass(list, h), want, "NO_PROXY={list:?} host {h}");
        }
    }

    fn choose_with(server: &str, vars: &[(&str, &str)]) -> Result<Option<Chosen>, ProxyError> {
        let server = Url::parse(server).expect("server url");
        choose(&server, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    fn chosen(server: &str, vars: &[(&str, &str)]) -> Option<(&'static str, String)> {
        choose_with(server, vars)
            .expect("usable")
            .map(|c| (c.variable, c.url.to_string()))
    }

    #[test]
    fn variables_are_read_as_curl_reads_them() {
        let http = "http://127.0.0.1:9000";
        let https = "https://osc.example";
        assert_eq!(chosen(http, &[]), None);
        // HTTP_PROXY in upper case is ignored (httpoxy); ALL_PROXY is the fallback.
        assert_eq!(chosen(http, &[("HTTP_PROXY", "http://p:1")]), None);
        assert_eq!(
            chosen(http, &[("http_proxy", "p:3128")]),
            Some(("http_proxy", "http://p:3128/".into()))
        );
        assert_eq!(
            chosen(
                http,
                &[("HTTP_PROXY", "http://a:1"), ("ALL_PROXY", "http://b:2")]
            ),
            Some(("ALL_PROXY", "http://b:2/".into()))
        );
        // Lower case first, upper case next; the scheme's own variable before ALL_PROXY.
        assert_eq!(
            chosen(
                https,
                &[
                    ("HTTPS_PROXY", "http://up:1"),
                    ("https_proxy", "http://low:2"),
                    ("all_proxy", "http://all:3")
                ]
            ),
            Some(("https_proxy", "http://low:2/".into()))
        );
        assert_eq!(
            chosen(
                https,
                &[
                    ("HTTPS_PROXY", "http://up:1"),
                    ("all_proxy", "http://all:3")
                ]
            ),
            Some(("HTTPS_PROXY", "http://up:1/".into()))
        );
        // https_proxy does not apply to an http:// server.
        assert_eq!(chosen(http, &[("https_proxy", "http://p:1")]), None);
        // Empty counts as unset.
        assert_eq!(
            chosen(
                https,
                &[("https_proxy", ""), ("ALL_PROXY", "https://all:3")]
            ),
            Some(("ALL_PROXY", "https://all:3/".into()))
        );
        // no_proxy before NO_PROXY; `*` matches an IP server.
        let p = ("http_proxy", "http://p:1");
        assert_eq!(chosen(http, &[p, ("NO_PROXY", "*")]), None);
        assert_eq!(chosen(http, &[p, ("no_proxy", "127.0.0.0/8")]), None);
        assert!(chosen(http, &[p, ("no_proxy", "example.com"), ("NO_PROXY", "*")]).is_some());
        assert_eq!(
            chosen(http, &[p, ("no_proxy", ""), ("NO_PROXY", "*")]),
            None
        );
    }

    #[test]
    fn unusable_proxies_are_errors_that_do_not_echo_the_value() {
        let e = choose_with(
            "https://osc.example",
            &[("HTTPS_PROXY", "socks5://user:hunter2@p:1080")],
        )
        .expect_err("socks");
        assert_eq!(e.variable, "HTTPS_PROXY");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(
            choose_with("http://x", &[("all_proxy", "http://user:pw@:1")]).is_err(),
            "no host"
        );
        // Excluded by NO_PROXY: never even parsed.
        assert_eq!(
            chosen(
                "http://10.0.0.1",
                &[("all_proxy", "socks5://p"), ("no_proxy", "10.0.0.0/8")]
            ),
            None
        );
    }
}
