//! `tamper`: every way a pod could try to reach the agent's control surface, each attempt's
//! outcome reported.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::json;

use crate::exchange::get;

/// One HTTP/1.0 request; its status code as text, or the error.
fn http_outcome(to: SocketAddr, method: &str, path: &str) -> String {
    match get(to, path, method) {
        Ok(v) if v["status"] != 0 => v["status"].to_string(),
        Ok(v) => v["error"].as_str().unwrap_or("no reply").to_owned(),
        Err(e) => e.to_string(),
    }
}

pub(crate) fn tamper(node: std::net::IpAddr, pin_dir: &std::path::Path) -> serde_json::Value {
    let at = |port| SocketAddr::new(node, port);
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    // Bytes that would mean "enroll me elsewhere / unenroll me" to a listener that took commands.
    let command_to = |to: SocketAddr| -> String {
        let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return "refused".into();
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = conn.write_all(b"POST /unenroll HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        let mut reply = Vec::new();
        match conn.read_to_end(&mut reply) {
            Ok(_) if reply.is_empty() => "closed without a reply".into(),
            Ok(_) => format!("replied {} bytes", reply.len()),
            Err(e) => format!("closed: {e}"),
        }
    };
    let map = pin_dir.join("maps").join(zt_common::map_names::ENROLLED);
    json!({
        "admin_on_node": http_outcome(at(15000), "POST", "/logging?level=off"),
        "admin_on_pod_loopback": http_outcome(loopback(15000), "POST", "/logging?level=off"),
        "metrics_post": http_outcome(at(15020), "POST", "/logging?level=off"),
        "metrics_config_dump": http_outcome(at(15020), "GET", "/config_dump"),
        "readiness_post": http_outcome(at(15021), "POST", "/logging?level=off"),
        "outbound_listener": command_to(loopback(15001)),
        "inbound_listener": command_to(loopback(15006)),
        "open_pinned_map": match aya::maps::MapData::from_pin(&map) {
            Ok(_) => "opened".to_owned(),
            Err(e) => format!("{e:?}"),
        },
    })
}
