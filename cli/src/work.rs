//! `gantry job …`: the commands the code inside a job runs, acting as that job's work
//! (WorkService): progress, events of its own, its result, artifacts, its inputs, child jobs.
//!
//! They take no API token: the runner gives the work GANTRY_ENDPOINT, GANTRY_WORK_TOKEN and
//! GANTRY_JOB_ID (see `client::Work`). What a command line says is checked, and files are
//! found, before any connection is made. Commands that only report (progress, event, result)
//! print nothing unless JSON is asked for: their output would land in the job's own log.
use std::{
    collections::HashSet,
    io::Read as _,
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use futures::StreamExt as _;
use gantry_proto as pb;

use crate::{
    args::{
        self, ArtifactCommand, ArtifactPutArgs, EventArgs, Global, JobCommand, JobSubmitArgs,
        Output, ProgressArgs, ResultArgs,
    },
    artifacts,
    client::{CliError, Result, Work, exit},
    jobs,
    render::{self, Table},
    transfer::{self, Source},
};

/// `gantry job …`.
pub async fn run(global: &Global, command: JobCommand) -> Result<u8> {
    match command {
        JobCommand::Progress(a) => progress(global, a).await,
        JobCommand::Event(a) => event(global, a).await,
        JobCommand::Result(a) => result(global, a).await,
        JobCommand::Artifact(ArtifactCommand::Put(a)) => artifact_put(global, a).await,
        JobCommand::Inputs => inputs(global).await,
        JobCommand::Submit(a) => submit(global, *a).await,
    }
}

/// `gantry job progress PERCENT [MESSAGE] [--stage STAGE]`.
async fn progress(global: &Global, args: ProgressArgs) -> Result<u8> {
    let progress = pb::Progress {
        percent: args.percent,
        stage: args.stage.unwrap_or_default(),
        message: args.message.unwrap_or_default(),
    };
    let mut w = Work::connect(global).await?;
    w.client
        .report_progress(pb::ReportProgressRequest {
            job_id: w.job_id.clone(),
            progress: Some(progress.clone()),
        })
        .await
        .map_err(|s| w.error(&s))?;
    if global.output == Output::Json {
        render::print_json(&serde_json::json!({
            "job_id": w.job_id,
            "progress": {"percent": progress.percent, "stage": progress.stage, "message": progress.message},
        }));
    }
    Ok(0)
}

/// `gantry job event KIND [MESSAGE] [--field KEY=VALUE]...`.
async fn event(global: &Global, args: EventArgs) -> Result<u8> {
    let mut w = Work::connect(global).await?;
    let sequence = w
        .client
        .append_event(pb::AppendEventRequest {
            job_id: w.job_id.clone(),
            event: Some(pb::WorkEvent {
                kind: args.kind,
                message: args.message.unwrap_or_default(),
                fields: args.fields.into_iter().collect(),
            }),
        })
        .await
        .map_err(|s| w.error(&s))?
        .into_inner()
        .sequence;
    if sequence == 0 {
        eprintln!("note: the job's event limit is reached; the event was not stored");
    }
    if global.output == Output::Json {
        render::print_json(&serde_json::json!({
            "job_id": w.job_id,
            "sequence": (sequence != 0).then_some(sequence),
        }));
    }
    Ok(0)
}

/// Bytes a result may be read from: past the largest message a server takes, whatever its
/// `--max-result-bytes`.
const RESULT_READ_LIMIT: usize = 64 << 20;

/// Reads all of `from` (at most [`RESULT_READ_LIMIT`] bytes); `what` names it in errors.
fn read_result(from: impl std::io::Read, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    from.take(RESULT_READ_LIMIT as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::usage(format!("{what}: {e}")))?;
    if bytes.len() > RESULT_READ_LIMIT {
        return Err(CliError::usage(format!(
            "{what}: more than {} MiB; a result is small (the server's --max-result-bytes, 1 MiB \
             unless configured): store large outputs with `gantry job artifact put`",
            RESULT_READ_LIMIT >> 20
        )));
    }
    Ok(bytes)
}

/// The media type of a result: as given, else `application/json` for a file named `*.json`,
/// else none.
pub fn result_content_type(args: &ResultArgs) -> String {
    if let Some(t) = &args.content_type {
        return t.clone();
    }
    let json = args.file.as_deref().is_some_and(|f| {
        f.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    });
    if json {
        "application/json".into()
    } else {
        String::new()
    }
}

/// `gantry job result (--file PATH | --data STRING | --stdin) [--content-type TYPE]`.
async fn result(global: &Global, args: ResultArgs) -> Result<u8> {
    let content_type = result_content_type(&args);
    let data = if let Some(path) = &args.file {
        let what = format!("--file {}", path.display());
        let file =
            std::fs::File::open(path).map_err(|e| CliError::usage(format!("{what}: {e}")))?;
        read_result(file, &what)?
    } else if let Some(data) = args.data {
        data.into_bytes()
    } else {
        read_result(std::io::stdin().lock(), "--stdin")?
    };
    let size = data.len();
    let mut w = Work::connect(global).await?;
    w.client
        .set_result(pb::SetResultRequest {
            job_id: w.job_id.clone(),
            result: Some(pb::JobResult {
                data,
                content_type: content_type.clone(),
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| w.error(&s))?;
    if global.output == Output::Json {
        render::print_json(&serde_json::json!({
            "job_id": w.job_id,
            "size": size,
            "content_type": content_type,
        }));
    }
    Ok(0)
}

/// A file to store, and the artifact name it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// The file.
    pub path: PathBuf,
    /// The artifact's name.
    pub name: String,
}

/// The artifact name of a path as given: its components joined by `/`, without `.`; an
/// absolute path, a `..` component or a name that is not UTF-8 is refused.
pub fn artifact_name(path: &Path) -> Result<String> {
    let shown = path.display();
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| {
                CliError::usage(format!(
                    "{shown}: the name is not UTF-8 (name it with --name)"
                ))
            })?),
            Component::ParentDir => {
                return Err(CliError::usage(format!(
                    "{shown}: an artifact is named by its path, which must not have `..` \
                     components (run from a directory above it, or name one file with --name)"
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(CliError::usage(format!(
                    "{shown}: an artifact is named by its path, which must be relative (run \
                     from a directory above it, or name one file with --name)"
                )));
            }
        }
    }
    Ok(parts.join("/"))
}

/// `name` under `prefix` (`""`: at the top).
fn joined(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Adds every file under `dir` (named under `prefix`) to `out`, in name order. Symbolic
/// links to files count as the files; links to directories are skipped (they may loop), as
/// is anything that is not a file.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<Upload>) -> Result<()> {
    let unreadable = |e: std::io::Error| CliError::usage(format!("{}: {e}", dir.display()));
    let mut entries = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| CliError::usage(format!("{}: the name is not UTF-8", path.display())))?;
        let name = joined(prefix, name);
        let kind = entry.file_type().map_err(unreadable)?;
        if kind.is_dir() {
            walk(&path, &name, out)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            out.push(Upload { path, name });
        } else {
            eprintln!("note: skipped {} (not a file)", path.display());
        }
    }
    Ok(())
}

/// The files `gantry job artifact put` stores, each with its name: a file is named by its
/// path as given, a directory gives every file under it (named by their paths); `--name`
/// names the one file given (whose path may then be anything).
pub fn uploads(paths: &[PathBuf], name: Option<&str>) -> Result<Vec<Upload>> {
    if let Some(name) = name {
        let [path] = paths else {
            return Err(CliError::usage("--name names one file: give one PATH"));
        };
        if let Some(problem) = args::relative_path_problem(name) {
            return Err(CliError::usage(format!("--name `{name}` {problem}")));
        }
        if !path.is_file() {
            return Err(CliError::usage(format!(
                "{}: {}",
                path.display(),
                if path.is_dir() {
                    "a directory (--name names one file)"
                } else {
                    "no such file"
                }
            )));
        }
        return Ok(vec![Upload {
            path: path.clone(),
            name: name.to_string(),
        }]);
    }
    let mut out = Vec::new();
    for path in paths {
        let name = artifact_name(path)?;
        let meta = std::fs::metadata(path)
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
        if meta.is_dir() {
            walk(path, &name, &mut out)?;
        } else if name.is_empty() {
            return Err(CliError::usage(format!(
                "{}: not a file name",
                path.display()
            )));
        } else {
            out.push(Upload {
                path: path.clone(),
                name,
            });
        }
    }
    // The same file given twice (or a file and its directory) is stored once.
    let mut seen = HashSet::new();
    out.retain(|u| seen.insert(u.name.clone()));
    if out.is_empty() {
        return Err(CliError::usage(
            "no files to store: the directories given are empty",
        ));
    }
    Ok(out)
}

/// Stores one file as an artifact of the job, streaming it from disk.
async fn put_one(w: &mut Work, upload: &Upload) -> Result<pb::Artifact> {
    let source = Source::open(&upload.path, "artifact").await?;
    let size = source.size();
    let tally = transfer::SharedTally::default();
    let header = pb::UploadArtifactRequest {
        part: Some(pb::upload_artifact_request::Part::Header(
            pb::ArtifactHeader {
                job_id: w.job_id.clone(),
                name: upload.name.clone(),
                size,
                digest: String::new(),
            },
        )),
    };
    let requests =
        futures::stream::iter([header]).chain(source.into_chunks(Arc::clone(&tally)).map(|data| {
            pb::UploadArtifactRequest {
                part: Some(pb::upload_artifact_request::Part::Data(data)),
            }
        }));
    let answer = w.client.upload_artifact(requests).await;
    let (sent, digest, error) = transfer::finish(&tally);
    if let Some(problem) = transfer::read_problem(&upload.path, size, sent, error) {
        return Err(problem);
    }
    let artifact = answer
        .map_err(|s| w.error(&s))?
        .into_inner()
        .artifact
        .ok_or_else(|| CliError::new(exit::REFUSED, "the server answered without the artifact"))?;
    artifacts::check_stored(
        &artifact.blob.clone().unwrap_or_default(),
        sent,
        &digest,
        &upload.path,
    )?;
    Ok(artifact)
}

/// `gantry job artifact put PATH... [--name NAME]`: stores each file, one after another,
/// then prints what was stored as `gantry artifacts` does (also when a later file failed:
/// what was stored before it, then the error).
async fn artifact_put(global: &Global, args: ArtifactPutArgs) -> Result<u8> {
    let uploads = uploads(&args.paths, args.name.as_deref())?;
    let mut w = Work::connect(global).await?;
    let mut stored = Vec::new();
    for upload in &uploads {
        match put_one(&mut w, upload).await {
            Ok(a) => stored.push(a),
            Err(e) => {
                if !stored.is_empty() {
                    artifacts::print_artifacts(&stored, global.output);
                }
                return Err(CliError::new(
                    e.code,
                    format!("artifact `{}`: {}", upload.name, e.message),
                ));
            }
        }
    }
    artifacts::print_artifacts(&stored, global.output);
    Ok(0)
}

/// `gantry job inputs`: a table (#, PATH, SOURCE, SIZE, DIGEST, UNAVAILABLE) or
/// `{"inputs": [...]}`.
async fn inputs(global: &Global) -> Result<u8> {
    let mut w = Work::connect(global).await?;
    let inputs = w
        .client
        .list_inputs(pb::ListInputsRequest {
            job_id: w.job_id.clone(),
        })
        .await
        .map_err(|s| w.error(&s))?
        .into_inner()
        .inputs;
    match global.output {
        Output::Json => render::print_json(&serde_json::json!({
            "inputs": inputs.iter().map(render::resolved_input_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut t = Table::new(&["#", "PATH", "SOURCE", "SIZE", "DIGEST", "UNAVAILABLE"]);
            for r in &inputs {
                let input = r.input.clone().unwrap_or_default();
                let (size, digest) = match &r.blob {
                    Some(b) => (b.size.to_string(), b.digest.clone()),
                    None => ("-".into(), "-".into()),
                };
                t.plain(vec![
                    r.index.to_string(),
                    input.path.clone(),
                    render::input_source(&input),
                    size,
                    digest,
                    r.unavailable.clone(),
                ]);
            }
            t.print();
        }
    }
    Ok(0)
}

/// `gantry job submit [OPTIONS] -- COMMAND [ARGS]...`: a child of this job; prints it as
/// `gantry submit` does.
async fn submit(global: &Global, args: JobSubmitArgs) -> Result<u8> {
    let spec = jobs::spec(&args.spec)?;
    let mut w = Work::connect(global).await?;
    let response = w
        .client
        .submit_child(pb::SubmitChildRequest {
            job_id: w.job_id.clone(),
            spec: Some(spec),
        })
        .await
        .map_err(|s| w.error(&s))?
        .into_inner();
    jobs::print_submitted(&response, global.output)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn job_command(line: &[&str]) -> std::result::Result<JobCommand, String> {
        let cli = Cli::try_parse_from(["gantry", "job"].into_iter().chain(line.iter().copied()))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Job(j) => Ok(j),
            other => Err(format!("not job: {other:?}")),
        }
    }

    #[test]
    fn artifact_names_are_the_paths_as_given() {
        let name = |p: &str| artifact_name(Path::new(p)).map_err(|e| e.message);
        assert_eq!(name("out/model.bin"), Ok("out/model.bin".into()));
        assert_eq!(name("./out//model.bin"), Ok("out/model.bin".into()));
        assert_eq!(name("out/./a/"), Ok("out/a".into()));
        assert_eq!(name("."), Ok(String::new()));
        let e = name("/etc/passwd").err().unwrap_or_default();
        assert!(e.contains("relative"), "{e}");
        let e = name("../secret").err().unwrap_or_default();
        assert!(e.contains("`..`"), "{e}");
        assert!(name("out/../x").is_err());
    }

    #[test]
    fn a_directory_gives_every_file_under_it() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("out/sub"))?;
        std::fs::create_dir_all(root.join("out/empty"))?;
        std::fs::write(root.join("out/b.txt"), "b")?;
        std::fs::write(root.join("out/a.txt"), "a")?;
        std::fs::write(root.join("out/sub/c.bin"), "c")?;
        std::os::unix::fs::symlink(root.join("out"), root.join("out/sub/loop"))?;
        std::fs::write(root.join("single.json"), "{}")?;
        // Paths are given relative to a directory: names are those paths, under it.
        let given = |p: &str| root.join(p);
        let walked = {
            let mut out = Vec::new();
            walk(&given("out"), "out", &mut out).map_err(|e| e.message)?;
            out
        };
        let names: Vec<_> = walked.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["out/a.txt", "out/b.txt", "out/sub/c.bin"]);
        assert_eq!(walked[2].path, given("out/sub/c.bin"));

        let one =
            uploads(&[given("single.json")], Some("result/summary.json")).map_err(|e| e.message)?;
        assert_eq!(one[0].name, "result/summary.json");
        for (paths, name) in [
            (vec![given("single.json"), given("out/a.txt")], Some("x")),
            (vec![given("out")], Some("x")),
            (vec![given("single.json")], Some("../x")),
            (vec![given("single.json")], Some("/x")),
            (vec![given("missing")], Some("x")),
        ] {
            let e = uploads(&paths, name).err().map(|e| e.code);
            assert_eq!(e, Some(exit::USAGE), "{paths:?} {name:?}");
        }
        // Absolute paths without --name are refused, naming the way out.
        let e = uploads(&[given("single.json")], None)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("--name"), "{e}");
        Ok(())
    }

    #[test]
    fn a_json_file_is_a_json_result() {
        let result = |line: &[&str]| match job_command(&[&["result"], line].concat()) {
            Ok(JobCommand::Result(r)) => Some(result_content_type(&r)),
            _ => None,
        };
        assert_eq!(
            result(&["--file", "out/summary.JSON"]).as_deref(),
            Some("application/json")
        );
        assert_eq!(result(&["--file", "out.txt"]).as_deref(), Some(""));
        assert_eq!(
            result(&["--data", "x", "--content-type", "text/plain"]).as_deref(),
            Some("text/plain")
        );
        assert_eq!(result(&["--stdin"]).as_deref(), Some(""));
        // One source, and one is needed.
        assert_eq!(result(&[]), None);
        assert_eq!(result(&["--data", "x", "--stdin"]), None);
        assert_eq!(result(&["--file", "a", "--data", "x"]), None);
    }

    #[test]
    fn the_work_commands_parse() {
        match job_command(&["progress", "40", "copying files", "--stage", "download"]) {
            Ok(JobCommand::Progress(p)) => {
                assert_eq!(p.percent, 40);
                assert_eq!(p.message.as_deref(), Some("copying files"));
                assert_eq!(p.stage.as_deref(), Some("download"));
            }
            other => panic!("{other:?}"),
        }
        assert!(job_command(&["progress", "101"]).is_err());
        assert!(job_command(&["progress", "-1"]).is_err());
        match job_command(&[
            "event",
            "checkpoint",
            "step 3",
            "--field",
            "step=3",
            "--field",
            "loss=0.1",
        ]) {
            Ok(JobCommand::Event(e)) => {
                assert_eq!(e.kind, "checkpoint");
                assert_eq!(e.message.as_deref(), Some("step 3"));
                assert_eq!(
                    e.fields,
                    vec![("step".into(), "3".into()), ("loss".into(), "0.1".into())]
                );
            }
            other => panic!("{other:?}"),
        }
        let e = job_command(&["event", "k", "--field", "novalue"])
            .err()
            .unwrap_or_default();
        assert!(e.contains("--field"), "{e}");
        match job_command(&["artifact", "put", "a", "b/", "--name", "n"]) {
            Ok(JobCommand::Artifact(ArtifactCommand::Put(p))) => {
                assert_eq!(p.paths, [PathBuf::from("a"), PathBuf::from("b/")]);
                assert_eq!(p.name.as_deref(), Some("n"));
            }
            other => panic!("{other:?}"),
        }
        assert!(job_command(&["artifact", "put"]).is_err());
        assert!(matches!(job_command(&["inputs"]), Ok(JobCommand::Inputs)));
        match job_command(&[
            "submit",
            "--input",
            "in/model.bin=0190a0b0-0000-7000-8000-000000000001:out/model.bin",
            "--artifact",
            "report.txt",
            "--",
            "sh",
            "-c",
            "true",
        ]) {
            Ok(JobCommand::Submit(s)) => {
                let spec = jobs::spec(&s.spec).map_err(|e| e.message);
                let spec = spec.unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(spec.command, ["sh", "-c", "true"]);
                assert_eq!(spec.artifacts, ["report.txt"]);
                assert_eq!(spec.inputs.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
