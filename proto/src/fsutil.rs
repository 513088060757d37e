//! `fsutil.*`: the file-sync wire types and the Go `os.FileMode` bits their
//! `Stat.mode` carries (shared/design/buildkit-wire.md §6.2).

/// `fsutil.types`: the file-sync `Packet` and `Stat` (generated).
#[allow(missing_docs, clippy::all)]
pub mod types {
    include!(concat!(env!("OUT_DIR"), "/fsutil.types.rs"));
}

/// Go `os.FileMode` bits as `fsutil.types.Stat.mode` carries them, and conversions
/// to and from Unix `st_mode`. The low 9 bits are the rwx permissions in both.
pub mod mode {
    /// `ModeDir`: a directory.
    pub const DIR: u32 = 1 << 31;
    /// `ModeAppend`: append-only (no Unix counterpart).
    pub const APPEND: u32 = 1 << 30;
    /// `ModeExclusive`: exclusive use (no Unix counterpart).
    pub const EXCLUSIVE: u32 = 1 << 29;
    /// `ModeTemporary`: temporary file (no Unix counterpart).
    pub const TEMPORARY: u32 = 1 << 28;
    /// `ModeSymlink`: a symbolic link.
    pub const SYMLINK: u32 = 1 << 27;
    /// `ModeDevice`: a device (block, or char with [`CHAR_DEVICE`]).
    pub const DEVICE: u32 = 1 << 26;
    /// `ModeNamedPipe`: a FIFO.
    pub const NAMED_PIPE: u32 = 1 << 25;
    /// `ModeSocket`: a Unix socket (fsutil clears it before sending).
    pub const SOCKET: u32 = 1 << 24;
    /// `ModeSetuid`: Unix `S_ISUID`.
    pub const SETUID: u32 = 1 << 23;
    /// `ModeSetgid`: Unix `S_ISGID`.
    pub const SETGID: u32 = 1 << 22;
    /// `ModeCharDevice`: with [`DEVICE`], a character device.
    pub const CHAR_DEVICE: u32 = 1 << 21;
    /// `ModeSticky`: Unix `S_ISVTX`.
    pub const STICKY: u32 = 1 << 20;
    /// `ModeIrregular`: a non-regular file of unknown type.
    pub const IRREGULAR: u32 = 1 << 19;
    /// All type bits (`ModeType`): an entry with none of them set is a regular file.
    pub const TYPE_MASK: u32 =
        DIR | SYMLINK | NAMED_PIPE | SOCKET | DEVICE | CHAR_DEVICE | IRREGULAR;
    /// The rwx permission bits.
    pub const PERM_MASK: u32 = 0o777;

    const S_IFMT: u32 = 0o170_000;
    const S_IFSOCK: u32 = 0o140_000;
    const S_IFLNK: u32 = 0o120_000;
    const S_IFREG: u32 = 0o100_000;
    const S_IFBLK: u32 = 0o060_000;
    const S_IFDIR: u32 = 0o040_000;
    const S_IFCHR: u32 = 0o020_000;
    const S_IFIFO: u32 = 0o010_000;
    const S_ISUID: u32 = 0o4000;
    const S_ISGID: u32 = 0o2000;
    const S_ISVTX: u32 = 0o1000;

    /// Whether a Go mode is a regular file, the only kind whose content a receiver
    /// may request.
    pub fn is_regular(go_mode: u32) -> bool {
        go_mode & TYPE_MASK == 0
    }

    /// Converts a Unix `st_mode` to Go `os.FileMode` bits.
    pub fn from_unix(st_mode: u32) -> u32 {
        let kind = match st_mode & S_IFMT {
            S_IFDIR => DIR,
            S_IFLNK => SYMLINK,
            S_IFBLK => DEVICE,
            S_IFCHR => DEVICE | CHAR_DEVICE,
            S_IFIFO => NAMED_PIPE,
            S_IFSOCK => SOCKET,
            _ => 0,
        };
        let mut go = kind | (st_mode & PERM_MASK);
        if st_mode & S_ISUID != 0 {
            go |= SETUID;
        }
        if st_mode & S_ISGID != 0 {
            go |= SETGID;
        }
        if st_mode & S_ISVTX != 0 {
            go |= STICKY;
        }
        go
    }

    /// Converts Go `os.FileMode` bits to a Unix `st_mode`. Bits without a Unix
    /// counterpart (append, exclusive, temporary) are dropped; an irregular entry
    /// gets no file-type bits.
    pub fn to_unix(go_mode: u32) -> u32 {
        let kind = if go_mode & DIR != 0 {
            S_IFDIR
        } else if go_mode & SYMLINK != 0 {
            S_IFLNK
        } else if go_mode & DEVICE != 0 {
            if go_mode & CHAR_DEVICE != 0 {
                S_IFCHR
            } else {
                S_IFBLK
            }
        } else if go_mode & NAMED_PIPE != 0 {
            S_IFIFO
        } else if go_mode & SOCKET != 0 {
            S_IFSOCK
        } else if go_mode & TYPE_MASK == 0 {
            S_IFREG
        } else {
            0
        };
        let mut st = kind | (go_mode & PERM_MASK);
        if go_mode & SETUID != 0 {
            st |= S_ISUID;
        }
        if go_mode & SETGID != 0 {
            st |= S_ISGID;
        }
        if go_mode & STICKY != 0 {
            st |= S_ISVTX;
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::mode;

    #[test]
    fn go_mode_bits_have_go_values() {
        assert_eq!(mode::DIR, 0x8000_0000);
        assert_eq!(mode::SYMLINK, 0x0800_0000);
        assert_eq!(mode::DEVICE, 0x0400_0000);
        assert_eq!(mode::NAMED_PIPE, 0x0200_0000);
        assert_eq!(mode::SOCKET, 0x0100_0000);
        assert_eq!(mode::SETUID, 0x0080_0000);
        assert_eq!(mode::SETGID, 0x0040_0000);
        assert_eq!(mode::CHAR_DEVICE, 0x0020_0000);
        assert_eq!(mode::STICKY, 0x0010_0000);
        assert_eq!(mode::IRREGULAR, 0x0008_0000);
        assert_eq!(mode::TYPE_MASK, 0x8F28_0000);
    }

    #[test]
    fn unix_modes_convert_to_go_and_back() {
        let cases = [
            (0o040_755, mode::DIR | 0o755),
            (0o100_644, 0o644),
            (0o120_777, mode::SYMLINK | 0o777),
            (0o060_660, mode::DEVICE | 0o660),
            (0o020_666, mode::DEVICE | mode::CHAR_DEVICE | 0o666),
            (0o010_600, mode::NAMED_PIPE | 0o600),
            (0o140_755, mode::SOCKET | 0o755),
            (0o104_755, mode::SETUID | 0o755),
            (0o042_775, mode::DIR | mode::SETGID | 0o775),
            (0o041_777, mode::DIR | mode::STICKY | 0o777),
        ];
        for (unix, go) in cases {
            assert_eq!(mode::from_unix(unix), go, "from_unix({unix:o})");
            assert_eq!(mode::to_unix(go), unix, "to_unix({go:#x})");
        }
    }

    #[test]
    fn only_entries_without_type_bits_are_regular() {
        assert!(mode::is_regular(0o644));
        assert!(mode::is_regular(mode::SETUID | mode::STICKY | 0o755));
        assert!(mode::is_regular(mode::APPEND | 0o600));
        for kind in [
            mode::DIR,
            mode::SYMLINK,
            mode::DEVICE,
            mode::NAMED_PIPE,
            mode::SOCKET,
            mode::CHAR_DEVICE,
            mode::IRREGULAR,
        ] {
            assert!(!mode::is_regular(kind | 0o644), "{kind:#x}");
        }
        assert_eq!(mode::to_unix(mode::IRREGULAR | 0o644), 0o644);
    }
}
