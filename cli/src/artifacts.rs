//! Data of jobs as users handle it: `gantry artifacts` (what a job published), `gantry
//! download` (one artifact's bytes, checked against its digest) and `gantry blob put | get`
//! (bytes stored beforehand, to be named as a later job's input).
use std::{path::Path, sync::Arc};

use futures::StreamExt as _;
use gantry_proto as pb;

use crate::{
    args::{BlobCommand, BlobGetArgs, BlobPutArgs, DownloadArgs, Global, Output},
    client::{CliError, Clients, Result, exit},
    render::{self, Table},
    transfer::{self, Dest, Source},
};

/// A job's artifacts, by name.
async fn list(c: &mut Clients, job_id: &str) -> Result<Vec<pb::Artifact>> {
    Ok(c.jobs
        .list_artifacts(pb::ListArtifactsRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner()
        .artifacts)
}

/// Prints artifacts: a table (NAME, SIZE, DIGEST, ATTEMPT) or `{"artifacts": [...]}`.
pub fn print_artifacts(artifacts: &[pb::Artifact], output: Output) {
    match output {
        Output::Json => render::print_json(&serde_json::json!({
            "artifacts": artifacts.iter().map(render::artifact_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut t = Table::new(&["NAME", "SIZE", "DIGEST", "ATTEMPT"]);
            for a in artifacts {
                let blob = a.blob.clone().unwrap_or_default();
                t.plain(vec![
                    a.name.clone(),
                    blob.size.to_string(),
                    blob.digest,
                    a.attempt.to_string(),
                ]);
            }
            t.print();
        }
    }
}

/// `gantry artifacts JOB`.
pub async fn artifacts(global: &Global, job_id: String) -> Result<u8> {
    let mut c = Clients::connect(global).await?;
    let artifacts = list(&mut c, &job_id).await?;
    print_artifacts(&artifacts, global.output);
    Ok(0)
}

/// The last component of an artifact's name (`out/model.bin` → `model.bin`).
fn base_name(name: &str) -> &str {
    name.rsplit('/').find(|c| !c.is_empty()).unwrap_or("")
}

/// Where `gantry download` writes: `--to`, else the artifact's base name here.
fn download_dest(args: &DownloadArgs) -> Result<Dest> {
    let base = base_name(&args.name);
    match (args.to.as_deref(), base) {
        (Some(to), _) => Dest::from_flag(Some(to), base, Dest::Stdout),
        (None, "" | "." | "..") => Err(CliError::usage(format!(
            "artifact `{}` has no base name to save it as: add --to PATH",
            args.name
        ))),
        (None, base) => Ok(Dest::File(base.into())),
    }
}

/// `gantry download JOB NAME [--to PATH]`: the artifact's bytes, streamed to the file (or
/// standard output), checked against the digest the job's listing gives.
pub async fn download(global: &Global, args: DownloadArgs) -> Result<u8> {
    let dest = download_dest(&args)?;
    let mut c = Clients::connect(global).await?;
    let artifact = list(&mut c, &args.job)
        .await?
        .into_iter()
        .find(|a| a.name == args.name)
        .ok_or_else(|| {
            CliError::new(
                exit::REFUSED,
                format!(
                    "not found: job {} has no artifact named `{}` (`gantry artifacts {}` lists them)",
                    args.job, args.name, args.job
                ),
            )
        })?;
    let blob = artifact.blob.unwrap_or_default();
    let mut stream = c
        .jobs
        .download_artifact(pb::DownloadArtifactRequest {
            job_id: args.job.clone(),
            name: args.name.clone(),
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let what = format!("artifact `{}` of job {}", args.name, args.job);
    let size = transfer::download(
        &mut stream,
        &dest,
        &blob.digest,
        Some(blob.size),
        &what,
        |s| c.error(s),
    )
    .await?;
    print_downloaded(
        &dest,
        global.output,
        serde_json::json!({
            "job_id": args.job,
            "name": args.name,
            "size": size,
            "digest": blob.digest,
        }),
    );
    Ok(0)
}

/// After a download to a file: its path, or (JSON) `fields` with `path`. Nothing after a
/// download to standard output (the bytes are the output).
fn print_downloaded(dest: &Dest, output: Output, mut fields: serde_json::Value) {
    let Dest::File(path) = dest else {
        return;
    };
    match output {
        Output::Json => {
            if let Some(o) = fields.as_object_mut() {
                o.insert("path".into(), path.display().to_string().into());
            }
            render::print_json(&fields);
        }
        Output::Table => println!("{}", path.display()),
    }
}

/// `gantry blob …`.
pub async fn blob(global: &Global, command: BlobCommand) -> Result<u8> {
    match command {
        BlobCommand::Put(a) => blob_put(global, a).await,
        BlobCommand::Get(a) => blob_get(global, a).await,
    }
}

/// `gantry blob put FILE`: prints the stored blob's digest (JSON: `{"digest", "size"}`).
async fn blob_put(global: &Global, args: BlobPutArgs) -> Result<u8> {
    let source = Source::open(&args.file, "blob").await?;
    let mut c = Clients::connect(global).await?;
    let size = source.size();
    let tally = transfer::SharedTally::default();
    let header = pb::UploadBlobRequest {
        part: Some(pb::upload_blob_request::Part::Header(pb::BlobHeader {
            size,
            digest: String::new(),
        })),
    };
    let requests =
        futures::stream::iter([header]).chain(source.into_chunks(Arc::clone(&tally)).map(|data| {
            pb::UploadBlobRequest {
                part: Some(pb::upload_blob_request::Part::Data(data)),
            }
        }));
    let answer = c.jobs.upload_blob(requests).await;
    let (sent, digest, error) = transfer::finish(&tally);
    if let Some(problem) = transfer::read_problem(&args.file, size, sent, error) {
        return Err(problem);
    }
    let blob = answer
        .map_err(|s| c.error(&s))?
        .into_inner()
        .blob
        .ok_or_else(|| CliError::new(exit::REFUSED, "the server answered without the blob"))?;
    check_stored(&blob, sent, &digest, &args.file)?;
    match global.output {
        Output::Json => render::print_json(&render::blob_json(Some(&blob))),
        Output::Table => println!("{}", blob.digest),
    }
    Ok(0)
}

/// Checks that what the server stored is what was sent.
pub fn check_stored(blob: &pb::Blob, sent: u64, digest: &str, path: &Path) -> Result<()> {
    if blob.digest != digest || blob.size != sent {
        return Err(CliError::new(
            exit::REFUSED,
            format!(
                "the server stored {} as {} bytes with digest {}, but {sent} bytes with digest {digest} were sent",
                path.display(),
                blob.size,
                blob.digest
            ),
        ));
    }
    Ok(())
}

/// `gantry blob get DIGEST [--to PATH]`: the blob's bytes (to standard output by default),
/// checked against the digest.
async fn blob_get(global: &Global, args: BlobGetArgs) -> Result<u8> {
    let dest = Dest::from_flag(args.to.as_deref(), "", Dest::Stdout)?;
    let mut c = Clients::connect(global).await?;
    let mut stream = c
        .jobs
        .download_blob(pb::DownloadBlobRequest {
            digest: args.digest.clone(),
        })
        .await
        .map_err(|s| c.error(&s))?
        .into_inner();
    let what = format!("blob {}", args.digest);
    let size = transfer::download(&mut stream, &dest, &args.digest, None, &what, |s| {
        c.error(s)
    })
    .await?;
    print_downloaded(
        &dest,
        global.output,
        serde_json::json!({"digest": args.digest, "size": size}),
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::{Cli, Command};

    fn download_args(line: &[&str]) -> DownloadArgs {
        let cli = Cli::try_parse_from(
            ["gantry", "download"]
                .into_iter()
                .chain(line.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match cli.command {
            Command::Download(d) => d,
            other => panic!("not download: {other:?}"),
        }
    }

    #[test]
    fn an_artifact_is_saved_under_its_base_name() {
        let dest = |line: &[&str]| download_dest(&download_args(line)).map_err(|e| e.message);
        assert_eq!(
            dest(&["j1", "out/model.bin"]),
            Ok(Dest::File("model.bin".into()))
        );
        assert_eq!(dest(&["j1", "model.bin", "--to", "-"]), Ok(Dest::Stdout));
        assert_eq!(
            dest(&["j1", "model.bin", "--to", "/nonexistent/m.bin"]),
            Ok(Dest::File("/nonexistent/m.bin".into()))
        );
        assert_eq!(base_name("out/dir/"), "dir");
        assert!(dest(&["j1", "."]).is_err());
    }

    #[test]
    fn a_blob_stored_otherwise_than_sent_is_an_error() {
        let blob = pb::Blob {
            digest: "sha256:aa".into(),
            size: 3,
        };
        assert!(check_stored(&blob, 3, "sha256:aa", Path::new("f")).is_ok());
        assert!(check_stored(&blob, 3, "sha256:bb", Path::new("f")).is_err());
        assert!(check_stored(&blob, 4, "sha256:aa", Path::new("f")).is_err());
    }
}
