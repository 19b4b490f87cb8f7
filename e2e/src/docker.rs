//! A Docker engine and docker compose stacks, for the compose end-to-end test.
//!
//! - [`Engine::ensure`]: uses the engine that answers, or starts `dockerd` and
//!   stops it on drop (only one it started).
//! - [`standin_env`]: builds (once, cached by the engine) the local stand-ins for the
//!   images compose names but no registry here serves (`envoy/images/standins.sh`)
//!   and returns the variables that select them.
//! - [`Stack`]: one compose profile brought up and waited on until every container is
//!   healthy (what `docker compose up --wait` does; Debian's docker-compose 1.29 has
//!   no `--wait`), brought down with its volumes on drop, also when a test panics.

use std::process::{Command, Output};
use std::time::Duration;

use crate::process::Proc;
use crate::{paths, poll_until, Error};

/// How long a profile may take to become healthy (the replicas' is the slowest).
pub const UP_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `command` and returns its stdout, or an error quoting both outputs.
pub fn run(command: &mut Command) -> Result<String, Error> {
    let out: Output = command
        .output()
        .map_err(|e| Error(format!("cannot run {command:?}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(Error(format!(
        "{command:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn docker(args: &[&str]) -> Result<String, Error> {
    run(Command::new("docker").args(args))
}

fn engine_answers() -> bool {
    docker(&["info", "--format", "{{.ServerVersion}}"]).is_ok()
}

/// A Docker engine that answers; `dockerd` if this process had to start it.
pub struct Engine {
    started: Option<Proc>,
}

impl Engine {
    /// The engine that answers, or a `dockerd` started here (as root), waited on for
    /// up to 60 s.
    pub fn ensure() -> Result<Engine, Error> {
        if engine_answers() {
            return Ok(Engine { started: None });
        }
        let how =
            "install it with `make deploy-tools` (apt-get install -y docker-compose docker.io)";
        let dockerd = paths::on_path("dockerd");
        if !dockerd.is_file() {
            return Err(Error(format!(
                "no Docker engine answers and dockerd is not installed: {how}"
            )));
        }
        let proc = Proc::spawn("dockerd", Command::new(dockerd))
            .map_err(|e| Error(format!("cannot start dockerd: {e}")))?;
        let up = poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
            (engine_answers() || !proc.is_running()).then_some(())
        });
        if up.is_none() || !proc.is_running() {
            return Err(proc.error(
                "the Docker engine did not come up (dockerd needs root and a kernel that \
                 allows containers)",
            ));
        }
        Ok(Engine {
            started: Some(proc),
        })
    }

    /// Whether this process started the engine (and will stop it).
    pub fn started_here(&self) -> bool {
        self.started.is_some()
    }
}

/// Builds the stand-in images if missing; returns the variables that make the
/// compose file use them (`ENVOY_IMAGE`, `REDIS_IMAGE`, ...).
pub fn standin_env() -> Result<Vec<(String, String)>, Error> {
    let out = run(Command::new("envoy/images/standins.sh").current_dir(paths::repo_root()))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The ids of what a compose project left: containers, networks, volumes.
pub fn leftovers(project: &str) -> Result<String, Error> {
    let label = format!("label=com.docker.compose.project={project}");
    let mut found = String::new();
    for kind in [
        &["ps", "-a"][..],
        &["network", "ls"][..],
        &["volume", "ls"][..],
    ] {
        let mut args = kind.to_vec();
        args.extend(["-q", "--filter", &label]);
        found.push_str(&docker(&args)?);
    }
    Ok(found.trim().to_owned())
}

/// One compose profile, up; `down -v` on drop.
pub struct Stack {
    project: String,
    env: Vec<(String, String)>,
    down: bool,
}

impl Stack {
    /// `docker-compose -p project --profile profile up -d --build` with `env`, then
    /// waits until every container of the project is healthy.
    pub fn up(project: &str, profile: &str, env: &[(String, String)]) -> Result<Stack, Error> {
        let mut env = env.to_vec();
        env.push(("COMPOSE_PROFILES".into(), profile.into()));
        let stack = Stack {
            project: project.to_owned(),
            env,
            down: false,
        };
        stack.compose(&["up", "-d", "--build"])?;
        stack.wait_healthy()?;
        Ok(stack)
    }

    /// Runs docker-compose on `envoy/docker-compose.yaml` with this stack's project,
    /// profile and environment.
    pub fn compose(&self, args: &[&str]) -> Result<String, Error> {
        let bin = paths::docker_compose_bin()?;
        let mut command = Command::new(bin);
        command
            .current_dir(paths::repo_root())
            .env_remove("REDIS_PASSWORD")
            .env_remove("REDIS_ADMIN_PASSWORD")
            .env_remove("MODE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["-f", "envoy/docker-compose.yaml", "-p", &self.project])
            .args(args);
        run(&mut command)
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> Result<String, Error> {
        let id = self.compose(&["ps", "-q", service])?.trim().to_owned();
        if id.is_empty() {
            return Err(Error(format!("no container for service {service}")));
        }
        Ok(id)
    }

    /// `docker exec` in `service`'s container, with the `env` names passed from this
    /// stack's environment (never on a command line). Returns stdout and stderr
    /// whatever the exit status: a refusal is what some checks expect.
    pub fn exec(&self, service: &str, env: &[&str], args: &[&str]) -> Result<String, Error> {
        let id = self.container(service)?;
        let mut command = Command::new("docker");
        command.arg("exec");
        for name in env {
            command.args(["-e", name]);
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg(&id)
            .args(args);
        let out = command
            .output()
            .map_err(|e| Error(format!("cannot run {command:?}: {e}")))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The host addresses the stack's containers publish (`docker port`).
    pub fn published(&self) -> Result<Vec<String>, Error> {
        let mut found = Vec::new();
        for id in self.compose(&["ps", "-q"])?.split_whitespace() {
            found.extend(
                docker(&["port", id])?
                    .lines()
                    .filter_map(|l| l.split_once(" -> ").map(|(_, host)| host.trim().to_owned())),
            );
        }
        found.sort();
        Ok(found)
    }

    /// The container's address on its compose network.
    pub fn ip(&self, service: &str) -> Result<String, Error> {
        let id = self.container(service)?;
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ])?;
        Ok(ip.trim().to_owned())
    }

    fn health(&self) -> Result<Vec<(String, String)>, Error> {
        let ids = self.compose(&["ps", "-q"])?;
        let mut states = Vec::new();
        for id in ids.split_whitespace() {
            let state = docker(&[
                "inspect",
                "-f",
                "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                id,
            ])?;
            let (name, rest) = state.trim().split_once(' ').unwrap_or((id, ""));
            states.push((name.to_owned(), rest.to_owned()));
        }
        Ok(states)
    }

    fn wait_healthy(&self) -> Result<(), Error> {
        let mut last = Vec::new();
        let done = poll_until(UP_TIMEOUT, Duration::from_secs(1), || {
            last = self.health().unwrap_or_default();
            let failed = last
                .iter()
                .any(|(_, s)| s.starts_with("exited") || s.ends_with("unhealthy"));
            let healthy = !last.is_empty() && last.iter().all(|(_, s)| s == "running healthy");
            (failed || healthy).then_some(!failed)
        });
        if done == Some(true) {
            return Ok(());
        }
        let logs = self
            .compose(&["logs", "--no-color", "--tail", "30"])
            .unwrap_or_else(|e| e.0);
        Err(Error(format!(
            "{} did not become healthy: {last:?}\n{logs}",
            self.project
        )))
    }

    /// `down -v`: removes the containers, the network and the volumes.
    pub fn down(&mut self) -> Result<(), Error> {
        self.down = true;
        self.compose(&["down", "-v", "--remove-orphans", "--timeout", "5"])
            .map(drop)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.down {
            if let Err(e) = self.down() {
                eprintln!("{e}");
            }
        }
    }
}
