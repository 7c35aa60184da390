//! `gatewayd safety read-rdsr FILE...`: an operator's check of the dose report reader
//! (`gateway_dicom::rdsr`) on files, without a daemon. One JSON object per file on stdout:
//! `{"file", "dose_report": null | {...}, "error": null | "..."}`. The report carries the
//! study's UIDs, accession number, manufacturer and the dose values; never the patient's
//! name, id, birth date or sex.

use std::path::Path;
use std::process::ExitCode;

use gateway_dicom::rdsr::{self, Code, DoseReport, IrradiationEvent};
use serde_json::{Value, json};

use crate::cli::SafetyCommand;

pub fn main(cmd: &SafetyCommand) -> ExitCode {
    match cmd {
        SafetyCommand::ReadRdsr { files } => {
            let mut ok = true;
            for file in files {
                let (line, read) = read_rdsr(file);
                ok &= read;
                println!("{line}");
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        SafetyCommand::Show { config, patient } => crate::ops::safety_show(config, patient),
    }
}

/// The JSON line for one file, and whether it was read (a dose report or not one).
fn read_rdsr(file: &Path) -> (Value, bool) {
    let name = file.display().to_string();
    let result = std::fs::read(file)
        .map_err(|e| format!("cannot read the file: {e}"))
        .and_then(|bytes| rdsr::read(&bytes).map_err(|e| e.to_string()));
    match result {
        Ok(report) => (
            json!({"file": name, "dose_report": report.as_ref().map(report_json), "error": null}),
            true,
        ),
        Err(e) => (
            json!({"file": name, "dose_report": null, "error": e}),
            false,
        ),
    }
}

fn code_json(c: &Code) -> Value {
    json!({"value": c.value, "scheme": c.scheme, "meaning": c.meaning})
}

fn event_json(e: &IrradiationEvent) -> Value {
    json!({
        "event_uid": e.event_uid,
        "datetime": e.datetime,
        "protocol": e.protocol,
        "target_region": e.target_region.as_ref().map(code_json),
        "acquisition_type": e.acquisition_type.as_ref().map(code_json),
        "ctdivol_mgy": e.ctdivol_mgy,
        "dlp_mgy_cm": e.dlp_mgy_cm,
    })
}

/// The report without its patient module.
fn report_json(r: &DoseReport) -> Value {
    json!({
        "sop_instance_uid": r.sop_instance_uid,
        "study_instance_uid": r.study_instance_uid,
        "accession_number": r.accession_number,
        "manufacturer": r.manufacturer,
        "datetime": r.datetime,
        "events": r.events.iter().map(event_json).collect::<Vec<_>>(),
        "accumulated": r.accumulated.as_ref().map(|a| json!({
            "total_events": a.total_events,
            "total_dlp_mgy_cm": a.total_dlp_mgy_cm,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_an_error_line_naming_the_file() {
        let (line, ok) = read_rdsr(Path::new("/nonexistent/dose.dcm"));
        assert!(!ok);
        assert_eq!(line["file"], "/nonexistent/dose.dcm");
        assert!(line["dose_report"].is_null());
        assert!(
            line["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot read"))
        );
    }

    #[test]
    fn a_file_that_is_not_dicom_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.dcm");
        std::fs::write(&path, b"not dicom").expect("write");
        let (line, ok) = read_rdsr(&path);
        assert!(!ok);
        assert!(
            line["error"]
                .as_str()
                .is_some_and(|e| e.contains("Part 10"))
        );
    }
}
