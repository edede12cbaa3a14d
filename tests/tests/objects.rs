//! What the XDP objects built by daemon/build.rs hold. The object ipaccessd loads and pins
//! (`PROGRAM_OBJECT`) holds the filter and its maps and nothing else; the benchmark's
//! reference programs and their map live in `BENCH_OBJECT`, which the benchmark loads and
//! which runs here under BPF_PROG_TEST_RUN.

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use aya_obj::Object;
use ipaccess::datapath::{BENCH_NO_STAMP_OBJECT, BENCH_OBJECT, PROGRAM_OBJECT};
use ipaccess_common::{
    MAP_ACCOUNT_SETS, MAP_ACCOUNTS, MAP_CONFIG, MAP_COUNTERS, MAP_HOST_COUNTERS, MAP_LAST_USED, MAP_SAMPLE_BUDGET,
    MAP_SAMPLES, MAP_SET_GROUPS, MAP_SLOTS, PROGRAM_NAME,
};
use ipaccess_tests::packets;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The names of an object's programs and of its maps, read from the ELF file without
/// loading anything into the kernel.
fn contents(bytes: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    let object = Object::parse(bytes).expect("parse the object");
    (object.programs.keys().cloned().collect(), object.maps.keys().cloned().collect())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[test]
fn production_object_holds_only_the_filter_and_its_maps() {
    let (programs, maps) = contents(PROGRAM_OBJECT);
    assert_eq!(programs, set(&[PROGRAM_NAME]));
    // IPACCESS_SAMPLE_TICK is the per-CPU clock of the sample budget: not pinned, so it has
    // no name in common.
    let expected = [
        MAP_SLOTS,
        MAP_ACCOUNTS,
        MAP_CONFIG,
        MAP_COUNTERS,
        MAP_HOST_COUNTERS,
        MAP_LAST_USED,
        MAP_SAMPLES,
        MAP_SAMPLE_BUDGET,
        MAP_SET_GROUPS,
        MAP_ACCOUNT_SETS,
        "IPACCESS_SAMPLE_TICK",
    ];
    assert_eq!(maps, set(&expected));
}

#[test]
fn bench_object_holds_only_the_reference_programs() {
    let (programs, maps) = contents(BENCH_OBJECT);
    assert_eq!(programs, set(&["ipaccess_floor", "ipaccess_calibration_hash"]));
    assert_eq!(maps, set(&["IPACCESS_CALIBRATION"]));
}

/// The benchmark's filter without stamps declares what the production filter declares, so
/// that loaded over the daemon's pin directory it reuses every pinned map and reads the
/// tables the daemon filled.
#[test]
fn bench_no_stamp_object_matches_the_production_object() {
    assert_eq!(contents(BENCH_NO_STAMP_OBJECT), contents(PROGRAM_OBJECT));
}

fn run(program: &Xdp, frame: &[u8]) -> u32 {
    let options = TestRunOptions { data_in: Some(frame), ..Default::default() };
    program.test_run(options).expect("BPF_PROG_TEST_RUN").return_value
}

/// The benchmark's programs load and verify on their own, with no pinned maps and no
/// filter beside them: the floor passes, the reference passes only frames whose key its
/// hash map holds.
#[test]
fn bench_object_loads_and_runs_alone() {
    let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
    for name in ["ipaccess_floor", "ipaccess_calibration_hash"] {
        let program: &mut Xdp = bench.program_mut(name).expect("in the object").try_into().unwrap();
        program.load().unwrap_or_else(|e| panic!("verifying {name}: {e}"));
    }
    let frame = packets::ipv4_tcp("198.19.0.1".parse().unwrap(), "198.18.0.1".parse().unwrap(), 40000, 443);
    let program = |name| -> &Xdp { bench.program(name).unwrap().try_into().unwrap() };
    assert_eq!(run(program("ipaccess_floor"), &frame), XDP_PASS);
    assert_eq!(run(program("ipaccess_calibration_hash"), &frame), XDP_DROP, "key not in the map yet");

    let key = u64::from_ne_bytes(frame[26..34].try_into().unwrap());
    let mut calibration: HashMap<_, u64, u64> =
        HashMap::try_from(bench.map_mut("IPACCESS_CALIBRATION").unwrap()).unwrap();
    calibration.insert(key, 1, 0).unwrap();
    let program = |name| -> &Xdp { bench.program(name).unwrap().try_into().unwrap() };
    assert_eq!(run(program("ipaccess_calibration_hash"), &frame), XDP_PASS, "key in the map");
}
