//! Where a sign-in came from, for support: the country and city a MaxMind-format database
//! (GeoLite2-City, GeoIP2-Country and the like) gives an address. Optional: the operator
//! names the file (`location_database`); without one, rows carry no location.
//!
//! The file is read into memory whole when the daemon starts and again on each reload (so
//! a database updated in place by `geoipupdate` is picked up by `systemctl reload`), never
//! mapped: a file rewritten under a mapping could fault the process. Addresses are looked
//! up only when support reads a summary, never on the login path, so a lookup that fails
//! costs that row its location and nothing else.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use log::debug;
use maxminddb::{Reader, geoip2};

use crate::protocol::Location;

/// A location database that was read and checked.
pub struct Locator {
    reader: Reader<Vec<u8>>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("the location database {}: {error}", path.display())]
    Unreadable { path: PathBuf, error: maxminddb::MaxMindDbError },
    #[error(
        "the location database {} is a {kind:?} database, which has no countries or cities: name a City or \
         Country database (GeoLite2-City, GeoIP2-Country, ...)",
        path.display()
    )]
    WrongKind { path: PathBuf, kind: String },
}

/// Database types that carry `country` and maybe `city` records: MaxMind's City, Country and
/// Enterprise, and the same shapes from others (DB-IP's `DBIP-City-Lite`, ...). ASN, ISP,
/// anonymous-IP and similar databases map addresses to other things.
fn has_places(database_type: &str) -> bool {
    let kind = database_type.to_ascii_lowercase();
    ["city", "country", "enterprise"].iter().any(|k| kind.contains(k))
}

impl Locator {
    /// Reads and checks the database at `path`: a missing or unreadable file, one that is
    /// not a MaxMind DB, or one of a kind without places is an error naming the file.
    pub fn open(path: &Path) -> Result<Locator, LocationError> {
        let reader = Reader::open_readfile(path)
            .map_err(|error| LocationError::Unreadable { path: path.to_path_buf(), error })?;
        let kind = &reader.metadata().database_type;
        if !has_places(kind) {
            return Err(LocationError::WrongKind { path: path.to_path_buf(), kind: kind.clone() });
        }
        Ok(Locator { reader, path: path.to_path_buf() })
    }

    /// The configured database, if any.
    pub fn load(path: Option<&Path>) -> Result<Option<Locator>, LocationError> {
        path.map(Locator::open).transpose()
    }

    /// For the log: which file, which kind of database, built when.
    pub fn describe(&self) -> String {
        let m = self.reader.metadata();
        let built = crate::time::format_utc(i64::try_from(m.build_epoch).unwrap_or(i64::MAX));
        format!("{} ({}, built {built} UTC)", self.path.display(), m.database_type)
    }

    /// The place the database gives `address` (as the activity log writes it), if it gives
    /// one: `None` for text that is not an address (`*`, the hour's overflow), an address
    /// the database does not cover, or a record it cannot decode.
    pub fn locate(&self, address: &str) -> Option<Location> {
        let ip: IpAddr = address.parse().ok()?;
        // The City record's fields all default, so a Country database decodes as one with
        // no city.
        let record = match self.reader.lookup(ip).and_then(|found| found.decode::<geoip2::City>()) {
            Ok(record) => record?,
            Err(e) => {
                debug!("location of {ip}: {e}");
                return None;
            }
        };
        let country = record.country.iso_code.map(str::to_owned);
        let city = record.city.names.english.map(str::to_owned);
        (country.is_some() || city.is_some()).then_some(Location { country, city })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_databases_with_places_are_taken() {
        for kind in ["GeoLite2-City", "GeoIP2-Country", "GeoIP2-Enterprise", "DBIP-City-Lite", "ipaccess-Test-City"] {
            assert!(has_places(kind), "{kind}");
        }
        for kind in ["GeoLite2-ASN", "GeoIP2-ISP", "GeoIP2-Anonymous-IP", "GeoIP2-Domain", ""] {
            assert!(!has_places(kind), "{kind}");
        }
    }

    #[test]
    fn a_file_that_is_no_database_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("GeoLite2-City.mmdb");
        std::fs::write(&path, b"not a database at all").unwrap();
        let e = Locator::open(&path).err().expect("refused").to_string();
        assert!(e.contains("GeoLite2-City.mmdb"), "{e}");
        let e = Locator::open(&dir.path().join("missing.mmdb")).err().expect("refused").to_string();
        assert!(e.contains("missing.mmdb"), "{e}");
        assert!(Locator::load(None).unwrap().is_none());
    }
}
