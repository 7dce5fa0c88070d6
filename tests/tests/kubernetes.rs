//! Root end-to-end test of Kubernetes discovery (issue 6). No API server can run on these
//! machines, so the agent talks to an in-test HTTP server that speaks the API's real list/watch
//! wire format (JSON lists with a resourceVersion, then chunked watch streams of ADDED, MODIFIED,
//! DELETED, BOOKMARK and ERROR events). The pods it describes are the test bed's real pods: the
//! agent finds their network namespaces by their IPs and enrolls them for real.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use serde_json::{Value, json};
use zt_tests::{Agent, Pod, Testbed, agent::node_config, maps, wait_until};

/// What the fake API server serves: the current pods and namespaces, and the open pod watches.
#[derive(Default)]
struct ApiState {
    resource_version: u64,
    pods: Vec<Value>,
    namespaces: Vec<Value>,
    pod_watches: Vec<mpsc::Sender<Option<String>>>,
    pod_lists: usize,
    /// Pod watches opened so far (a stale sender can linger in `pod_watches`).
    pod_watch_starts: usize,
    /// While set, pod lists are held back (the API is slow to answer).
    hold_pod_lists: bool,
}

#[derive(Clone)]
struct FakeApiServer {
    state: Arc<Mutex<ApiState>>,
    addr: SocketAddr,
}

impl FakeApiServer {
    /// Listens inside `netns` (the agent's node), on loopback there.
    fn start(netns: &std::path::Path) -> Self {
        let ns = std::fs::File::open(netns).unwrap();
        let listener = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .join()
        .unwrap();
        let server = Self {
            state: Arc::default(),
            addr: listener.local_addr().unwrap(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || s.serve(conn));
            }
        });
        server
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap()
    }

    /// Serves requests on one keep-alive connection; a watch takes it over until it ends.
    fn serve(&self, conn: TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut out = conn;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut content_length = 0usize;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 {
                    return;
                }
                if header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    content_length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; content_length];
            let _ = reader.read_exact(&mut body);
            let target = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let watching = query
                .split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1");
            match (path, watching) {
                ("/api/v1/pods", false) => {
                    while self.lock().hold_pod_lists {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let list = {
                        let mut state = self.lock();
                        state.pod_lists += 1;
                        json!({"apiVersion": "v1", "kind": "PodList",
                               "metadata": {"resourceVersion": state.resource_version.to_string()},
                               "items": state.pods})
                    };
                    respond_json(&mut out, &list);
                }
                ("/api/v1/namespaces", false) => {
                    let list = {
                        let state = self.lock();
                        json!({"apiVersion": "v1", "kind": "NamespaceList",
                               "metadata": {"resourceVersion": state.resource_version.to_string()},
                               "items": state.namespaces})
                    };
                    respond_json(&mut out, &list);
                }
                ("/api/v1/pods", true) => {
                    let (tx, rx) = mpsc::channel();
                    {
                        let mut state = self.lock();
                        state.pod_watches.push(tx);
                        state.pod_watch_starts += 1;
                    }
                    stream_events(out, rx);
                    return;
                }
                ("/api/v1/namespaces", true) => {
                    // Namespaces do not change in this test: a quiet watch (the sender lives
                    // as long as the stream, so it stays open).
                    let (tx, rx) = mpsc::channel::<Option<String>>();
                    let _open = tx;
                    stream_events(out, rx);
                    return;
                }
                _ => {
                    let _ = write!(out, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                }
            }
        }
    }

    /// Sends `raw` (a watch line, or garbage) to every open pod watch; `None` hangs them up.
    fn broadcast(&self, raw: Option<String>) {
        let mut state = self.lock();
        state.pod_watches.retain(|w| w.send(raw.clone()).is_ok());
    }

    /// Applies a pod change to the state and sends it as a watch event.
    fn pod_event(&self, kind: &str, mut pod: Value) {
        {
            let mut state = self.lock();
            state.resource_version += 1;
            pod["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            let name = pod["metadata"]["name"].clone();
            state.pods.retain(|p| p["metadata"]["name"] != name);
            if kind != "DELETED" {
                state.pods.push(pod.clone());
            }
        }
        self.broadcast(Some(json!({"type": kind, "object": pod}).to_string()));
    }

    fn pod_watch_starts(&self) -> usize {
        self.lock().pod_watch_starts
    }
}

fn respond_json(out: &mut TcpStream, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// A chunked watch response; each message is one line (an event), until `None` or the sender
/// goes away.
fn stream_events(mut out: TcpStream, rx: mpsc::Receiver<Option<String>>) {
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let _ = out.flush();
    while let Ok(Some(line)) = rx.recv() {
        let chunk = if line.ends_with('}') {
            format!("{line}\n")
        } else {
            line
        };
        if write!(out, "{:x}\r\n{chunk}\r\n", chunk.len()).is_err() {
            return;
        }
        let _ = out.flush();
    }
    let _ = out.shutdown(std::net::Shutdown::Both);
}

fn pod_object(pod: &Pod, annotation: Option<&str>) -> Value {
    let mut meta = json!({"name": pod.name, "namespace": "default", "uid": format!("uid-{}", pod.name),
                          "labels": {"app": pod.name}});
    if let Some(a) = annotation {
        meta["annotations"] = json!({"zt.io/mesh": a});
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {"nodeName": "node2", "serviceAccountName": format!("sa-{}", pod.name),
                    "containers": [{"name": "app", "image": "app:1"}]},
           "status": {"phase": "Running", "podIP": pod.ip(false).to_string()}})
}

/// Node 2's config: no static workloads, Kubernetes discovery from `api`, and only node 2's pods
/// in its netns directory.
fn discovery_config(bed: &Testbed, api: &FakeApiServer) -> String {
    node_config(bed.node(2), &[], "").replace(
        "[policy]",
        &format!(
            "[discovery.kubernetes]\nenabled = true\napi_server = \"http://{}\"\nnetns_dir = \"{}\"\n[policy]",
            api.addr,
            bed.netns_dir(2).unwrap().display()
        ),
    )
}

fn enrolled_events(agent: &Agent, message: &str, workload: &str) -> usize {
    agent
        .events()
        .unwrap()
        .iter()
        .filter(|e| e["message"] == message && e["workload"] == workload)
        .count()
}

fn wait_enrolled(agent: &Agent, workload: &str, times: usize) {
    wait_until(Duration::from_secs(10), || {
        Ok(enrolled_events(agent, "workload enrolled", workload) >= times)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{workload} not enrolled ({times}): {e}\n{}",
            agent.log_tail()
        )
    });
}

fn wait_unenrolled(agent: &Agent, workload: &str, times: usize) {
    wait_until(Duration::from_secs(10), || {
        Ok(enrolled_events(agent, "workload un-enrolled", workload) >= times)
    })
    .unwrap_or_else(|e| panic!("{workload} not un-enrolled: {e}\n{}", agent.log_tail()));
}

#[test]
fn kubernetes_discovery_follows_list_watch_bookmarks_and_relists() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let node = bed.node(2).clone();
    let api = FakeApiServer::start(&node.netns);
    {
        let mut state = api.lock();
        state.resource_version = 10;
        // The namespace opts in; n2p2 opts out by annotation.
        state.namespaces = vec![json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "default", "resourceVersion": "1", "labels": {"zt.io/mesh": "enabled"}}})];
        state.pods = vec![pod_object(&p21, None), pod_object(&p22, Some("disabled"))];
        state.hold_pod_lists = true;
    }
    let config = discovery_config(&bed, &api);
    let agent = Agent::start_with_config(&mut bed, 2, &config).unwrap();

    // Until the first list arrives the agent does not know what to enroll: not ready.
    let (status, body) = agent.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for the first list"), "{body}");
    api.lock().hold_pod_lists = false;

    // The list: n2p1 is enrolled (namespace label), n2p2 is not (its annotation).
    wait_enrolled(&agent, "default/n2p1", 1);
    wait_until(Duration::from_secs(5), || Ok(api.pod_watch_starts() >= 1)).unwrap();
    assert_eq!(
        enrolled_events(&agent, "workload enrolled", "default/n2p2"),
        0
    );
    let cookie = agent.netns_cookie(&p21).unwrap();
    assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&cookie));
    wait_until(Duration::from_secs(5), || Ok(agent.readiness()?.0 == 200)).unwrap();

    // MODIFIED: n2p2 opts in.
    api.pod_event("MODIFIED", pod_object(&p22, Some("enabled")));
    wait_enrolled(&agent, "default/n2p2", 1);

    // A bookmark changes nothing.
    api.broadcast(Some(
        json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"resourceVersion": "12"}}})
        .to_string(),
    ));

    // DELETED: n2p1 leaves, and with it its capture state.
    api.pod_event("DELETED", pod_object(&p21, None));
    wait_unenrolled(&agent, "default/n2p1", 1);
    assert!(!maps::enrolled(&node.pin_dir).unwrap().contains(&cookie));

    // 410 Gone: the watcher relists, and finds n2p1 back (added while the watch was stale).
    api.lock().pods.push(pod_object(&p21, None));
    let lists = api.lock().pod_lists;
    api.broadcast(Some(
        json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}})
        .to_string(),
    ));
    wait_until(Duration::from_secs(10), || Ok(api.lock().pod_lists > lists))
        .unwrap_or_else(|e| panic!("no relist after 410: {e}\n{}", agent.log_tail()));
    wait_enrolled(&agent, "default/n2p1", 2);

    // A watch stream that breaks mid-event: logged, retried, and nothing enrolled is lost.
    // (the watch opened after the relist is the one to break)
    wait_until(Duration::from_secs(10), || Ok(api.pod_watch_starts() > 1)).unwrap();
    let watches = api.pod_watch_starts();
    api.broadcast(Some(
        "{\"type\": \"MODIFIED\", \"object\": {\"metad".to_owned(),
    ));
    api.broadcast(None);
    wait_until(Duration::from_secs(10), || {
        Ok(agent.count("pod watch failed; retrying (enrolled pods are kept)")? >= 1)
    })
    .unwrap_or_else(|e| panic!("broken stream not reported: {e}\n{}", agent.log_tail()));
    wait_until(Duration::from_secs(10), || {
        Ok(api.pod_watch_starts() > watches)
    })
    .unwrap();
    assert_eq!(
        enrolled_events(&agent, "workload un-enrolled", "default/n2p2"),
        0
    );
    let p22_cookie = agent.netns_cookie(&p22).unwrap();
    assert!(maps::enrolled(&node.pin_dir).unwrap().contains(&p22_cookie));

    // Opting out removes the pod.
    api.pod_event("MODIFIED", pod_object(&p22, Some("disabled")));
    wait_unenrolled(&agent, "default/n2p2", 1);
    assert!(!maps::enrolled(&node.pin_dir).unwrap().contains(&p22_cookie));
}

#[test]
fn a_pod_that_reuses_a_dead_pods_ip_is_enrolled_in_its_own_namespace() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let node = bed.node(2).clone();
    let api = FakeApiServer::start(&node.netns);
    let reused_ip = p21.ipv4.to_string();
    let pod = |name: &str, service_account: &str| {
        let mut object = pod_object(&p21, Some("enabled"));
        object["metadata"]["name"] = json!(name);
        object["metadata"]["uid"] = json!(format!("uid-{name}"));
        object["spec"]["serviceAccountName"] = json!(service_account);
        object
    };
    {
        let mut state = api.lock();
        state.resource_version = 10;
        state.namespaces = vec![json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "default", "resourceVersion": "1"}})];
        state.pods = vec![pod("old", "sa-old")];
    }
    let config = discovery_config(&bed, &api);
    let agent = Agent::start_with_config(&mut bed, 2, &config).unwrap();
    wait_enrolled(&agent, "default/old", 1);
    wait_until(Duration::from_secs(5), || Ok(api.pod_watch_starts() >= 1)).unwrap();

    // The old pod goes; its IP is given to a pod of another service account in another
    // network namespace (the old namespace lives on without it, as a dying sandbox can).
    api.pod_event("DELETED", pod("old", "sa-old"));
    wait_unenrolled(&agent, "default/old", 1);
    let ns = |p: &Pod| p.netns.file_name().unwrap().to_str().unwrap().to_owned();
    zt_tests::sh(
        "ip",
        &[
            "-n",
            &ns(&p21),
            "addr",
            "del",
            &format!("{reused_ip}/24"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    zt_tests::sh(
        "ip",
        &[
            "-n",
            &ns(&p22),
            "addr",
            "add",
            &format!("{reused_ip}/24"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    api.pod_event("ADDED", pod("new", "sa-new"));
    wait_enrolled(&agent, "default/new", 1);
    let enrolled = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "workload enrolled" && e["workload"] == "default/new")
        .unwrap();
    assert!(
        enrolled["netns"].as_str().unwrap().ends_with(&ns(&p22)),
        "the new pod was enrolled in the dead pod's namespace: {enrolled}"
    );
}
