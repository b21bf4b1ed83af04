//! Deserializers that refuse a sequence or map as soon as it grows past its limit, so a
//! length prefix from the wire can never make the decoder hold more than the limit allows
//! (`check()` methods re-check the same limits on values built locally).
//!
//! Used as `#[serde(deserialize_with = "crate::bounded::seq::<_, _, LIMIT>")]`.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

/// A `Vec<T>` of at most `N` elements.
pub(crate) fn seq<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {N} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if seq.size_hint().is_some_and(|n| n > N) {
                return Err(A::Error::invalid_length(
                    seq.size_hint().unwrap_or(0),
                    &self,
                ));
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N));
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(A::Error::invalid_length(N + 1, &self));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V::<T, N>(PhantomData))
}

/// A `BTreeMap<K, V>` of at most `N` entries.
pub(crate) fn map<'de, D, K, V, const N: usize>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct M<K, V, const N: usize>(PhantomData<(K, V)>);
    impl<'de, K, V, const N: usize> Visitor<'de> for M<K, V, N>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a map of at most {N} entries")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            if map.size_hint().is_some_and(|n| n > N) {
                return Err(A::Error::invalid_length(
                    map.size_hint().unwrap_or(0),
                    &self,
                ));
            }
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry()? {
                if out.len() == N {
                    return Err(A::Error::invalid_length(N + 1, &self));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(M::<K, V, N>(PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct T {
        #[serde(deserialize_with = "super::seq::<_, _, 3>")]
        v: Vec<u32>,
        #[serde(deserialize_with = "super::map::<_, _, _, 2>")]
        m: BTreeMap<u8, u8>,
    }

    #[test]
    fn refuses_past_the_limit() {
        let ok = T {
            v: vec![1, 2, 3],
            m: BTreeMap::from([(1, 1), (2, 2)]),
        };
        let bytes = postcard::to_stdvec(&ok).unwrap();
        assert_eq!(postcard::from_bytes::<T>(&bytes).unwrap(), ok);
        let long = T {
            v: vec![1, 2, 3, 4],
            m: BTreeMap::new(),
        };
        assert!(postcard::from_bytes::<T>(&postcard::to_stdvec(&long).unwrap()).is_err());
        let wide = T {
            v: vec![],
            m: BTreeMap::from([(1, 1), (2, 2), (3, 3)]),
        };
        assert!(postcard::from_bytes::<T>(&postcard::to_stdvec(&wide).unwrap()).is_err());
        // A huge claimed length with no elements behind it fails without allocating for it.
        assert!(postcard::from_bytes::<T>(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
