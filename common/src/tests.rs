//! Round trips of every word layout: what a constructor packs, the accessors read back,
//! and the bits stay where the pinned maps (`PIN_SUBDIR`) have them.

use std::net::IpAddr;

use crate::*;

const MODES: [PolicyMode; 4] = [PolicyMode::Unset, PolicyMode::Off, PolicyMode::Monitor, PolicyMode::Enforce];

#[test]
fn policy_round_trips() {
    for mode in MODES {
        for suspended in [false, true] {
            let policy = Policy::new(mode, suspended);
            assert_eq!((policy.mode(), policy.is_suspended()), (mode, suspended));
            assert_eq!(Policy::from_bits(policy.to_bits()), policy);
        }
    }
    assert_eq!(Policy::default(), Policy::UNSET);
    assert_eq!(Policy::UNSET.mode(), PolicyMode::Unset);
    // The encoding of the pinned maps: mode in bits 0-1, suspension in bit 2.
    assert_eq!(Policy::new(PolicyMode::Enforce, false).to_bits(), 3);
    assert_eq!(Policy::new(PolicyMode::Off, true).to_bits(), 0b101);
    assert_eq!(Policy::from_bits(u64::MAX), Policy::new(PolicyMode::Enforce, true));
}

#[test]
fn account_word_round_trips() {
    let tables = [TableDesc::NONE, TableDesc::new(0, 1), TableDesc::new((1 << 28) - 1, 20), TableDesc::new(12345, 27)];
    for account in [0, 1, 4242, AccountWord::MAX_ACCOUNT] {
        for mode in MODES {
            for suspended in [false, true] {
                for table in tables {
                    for ports in [false, true] {
                        let policy = Policy::new(mode, suspended);
                        let word = AccountWord::new(account, policy, table).with_port_bindings(ports);
                        assert_eq!(word.account(), account);
                        assert_eq!(word.policy(), policy);
                        assert_eq!(word.table(), table);
                        assert_eq!(word.has_port_bindings(), ports);
                        assert_eq!(AccountWord::from_bits(word.to_bits()), word);
                        assert!(!word.with_port_bindings(false).has_port_bindings());
                    }
                }
            }
        }
    }
    let none = AccountWord::NONE.with_port_bindings(true);
    assert_eq!((none.account(), none.table(), none.policy()), (NO_ACCOUNT, TableDesc::NONE, Policy::UNSET));
    // The pinned layout: account << 38 | ports << 37 | policy << 34 | present << 33 | log2 << 28 | header.
    let word =
        AccountWord::new(7, Policy::new(PolicyMode::Monitor, true), TableDesc::new(5, 3)).with_port_bindings(true);
    assert_eq!(word.to_bits(), 7 << 38 | 1 << 37 | 0b110 << 34 | 1 << 33 | 3 << 28 | 5);
}

#[test]
fn meta_round_trips() {
    let tags = [Tag::allow(9, FAMILY_V6, 128), Tag::port_binding(FAMILY_V4, 17, 65535), Tag::address(FAMILY_V6)];
    for tag in tags {
        for version in [0, 1, 0xfffe, 0xffff] {
            let live = Meta::live(tag, version);
            assert_eq!((live.state(), live.version(), live.tag()), (SlotState::Live, version, tag));
            assert!(live.is_live() && !live.is_empty());
            assert_eq!(Meta::from_bits(live.to_bits()), live);
        }
    }
    assert_eq!(Meta::live(tags[0], 0x1_0003).version(), 3, "versions wrap at 16 bits");
    let dead = Meta::dead(0x1_0001);
    assert_eq!((dead.state(), dead.version()), (SlotState::Dead, 1));
    assert!(!dead.is_live() && !dead.is_empty());
    assert_eq!(Meta::default().state(), SlotState::Empty);
    assert!(Meta::default().is_empty());
    assert_eq!(Meta::from_bits(3).state(), SlotState::Dead);
    // The pinned layout: tag << 18 | version << 2 | state.
    assert_eq!(Meta::live(Tag::address(FAMILY_V4), 5).to_bits(), (3 << 44) << 18 | 5 << 2 | 1);
}

#[test]
fn tag_round_trips() {
    for family in [FAMILY_V4, FAMILY_V6] {
        for (owner, len) in [(1, 0), (77, 32), (AccountWord::MAX_ACCOUNT, 128)] {
            let tag = Tag::allow(owner, family, len);
            assert_eq!(tag.kind(), Some(TagKind::Allow));
            assert_eq!((tag.family(), tag.owner(), tag.prefix_len()), (family, Some(owner), Some(len)));
            assert_eq!((tag.protocol(), tag.port()), (None, None));
        }
        for (protocol, port) in [(6, 0), (17, 443), (255, 65535)] {
            let tag = Tag::port_binding(family, protocol, port);
            assert_eq!(tag.kind(), Some(TagKind::Port));
            assert_eq!((tag.family(), tag.protocol(), tag.port()), (family, Some(protocol), Some(port)));
            assert_eq!((tag.owner(), tag.prefix_len()), (None, None));
        }
        let tag = Tag::address(family);
        assert_eq!((tag.kind(), tag.family(), tag.port(), tag.owner()), (Some(TagKind::Addr), family, None, None));
    }
    // Kinds never collide, even with the same low bits.
    assert_ne!(Tag::allow(443 | 6 << 16, FAMILY_V4, 0), Tag::port_binding(FAMILY_V4, 6, 443));
    // The pinned layout, which the hash also depends on.
    assert_eq!(Tag::port_binding(FAMILY_V6, 6, 443).to_bits(), 2 << 44 | 1 << 40 | 6 << 16 | 443);
    assert_eq!(Tag::allow(3, FAMILY_V4, 24).to_bits(), 1 << 44 | 24 << 32 | 3);
    assert!(Meta::live(Tag::address(FAMILY_V6), 0).tag().to_bits() < 1 << 46, "a tag fits above the version");
}

#[test]
fn addr_words_round_trip() {
    for text in ["0.0.0.0", "192.0.2.1", "255.255.255.255", "::", "2001:db8::1", "ffff:ffff::ffff", "::ffff:1.2.3.4"] {
        let addr: IpAddr = text.parse().unwrap();
        let (family, words) = AddrWords::of(addr);
        assert_eq!(family, if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 });
        assert_eq!(AddrWords::from(addr), words);
        assert_eq!(words.to_ip(family), addr, "{text}");
    }
    assert_eq!(AddrWords::from("192.0.2.1".parse::<IpAddr>().unwrap()), AddrWords { hi: 0, lo: 0xc000_0201 });
    let v6 = AddrWords::from("2001:db8::1".parse::<IpAddr>().unwrap());
    assert_eq!(v6, AddrWords { hi: 0x2001_0db8_0000_0000, lo: 1 });
    assert_eq!(v6.top(false), 0x2001_0db8_0000_0000);
    assert_eq!(AddrWords::v4(0xc000_0201).top(true), 0xc000_0201_0000_0000);
}

#[test]
fn drop_reasons_round_trip() {
    for reason in DropReason::ALL {
        assert_eq!(DropReason::from_u8(reason as u8), Some(reason));
        assert_eq!(DropReason::try_from(reason as u8), Ok(reason));
    }
    let names: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names, ["address_not_allowed", "monitor_would_deny", "suspended", "malformed", "account_unset"]);
    for byte in [0, 6, 255] {
        assert_eq!(DropReason::try_from(byte), Err(byte));
    }
    let sample = DropSample { reason: 9, ..Default::default() };
    assert_eq!(sample.drop_reason(), Err(9));
}

#[test]
fn drop_sample_addresses() {
    let sample = DropSample {
        family: FAMILY_V6 as u8,
        src_hi: 0x2001_0db8_0000_0000,
        src_lo: 7,
        dst_lo: 1,
        reason: DropReason::Malformed as u8,
        ..Default::default()
    };
    assert_eq!(sample.source(), "2001:db8::7".parse::<IpAddr>().unwrap());
    assert_eq!(sample.destination(), "::1".parse::<IpAddr>().unwrap());
    assert_eq!(sample.drop_reason(), Ok(DropReason::Malformed));
    let v4 = DropSample { family: FAMILY_V4 as u8, src_lo: 0x0a00_0001, ..sample };
    assert_eq!(v4.source(), "10.0.0.1".parse::<IpAddr>().unwrap());
}

#[test]
fn record_fields_name_their_words() {
    assert_eq!(size_of::<AccountRecord>(), 16);
    assert_eq!(size_of::<Config>(), 32);
    assert_eq!(size_of::<Policy>(), 8);
    assert_eq!(size_of::<AccountWord>(), 8);
    assert_eq!(size_of::<Meta>(), 8);
    assert_eq!(size_of::<Tag>(), 8);
    let config = Config { bindings: 10, samples_per_second: 11, sample_burst: 12, clock: 13 };
    // SAFETY: Config is repr(C), four u64 words.
    let words: [u64; 4] = unsafe { std::mem::transmute(config) };
    assert_eq!(words[ConfigField::Bindings.word()], 10);
    assert_eq!(words[ConfigField::SamplesPerSecond.word()], 11);
    assert_eq!(words[ConfigField::SampleBurst.word()], 12);
    assert_eq!(words[ConfigField::Clock.word()], 13);
    let record = AccountRecord { policy: 20, table: 21 };
    // SAFETY: AccountRecord is repr(C), two u64 words.
    let words: [u64; 2] = unsafe { std::mem::transmute(record) };
    assert_eq!((words[AccountField::Policy.word()], words[AccountField::Table.word()]), (20, 21));
}
