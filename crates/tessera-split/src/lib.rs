//! `tessera-split`: exact integer splits by the largest-remainder method, the one rule Tessera
//! divides anything by — a round's reward units by score (`tessera-contest`), an epoch's
//! revenue by balance (the ledger, `tessera-trust`), and the same revenue on chain (the NEAR
//! contract). Each part is the floor of its exact share; the units left over go one each to
//! the largest remainders, ties to the earlier entry. The parts sum to the amount exactly and
//! each is within one unit of its exact share.
//!
//! No dependencies beyond 256-bit integers (amount × weight of two u128 needs them), so the
//! contract can link it as it is.

mod wide {
    // The macro's own arithmetic, not ours.
    #![allow(clippy::manual_div_ceil)]
    uint::construct_uint! {
        pub struct U256(4);
    }
}
use wide::U256;

/// Splits `amount` in proportion to `weights`. All zeros when no weight is positive.
pub fn largest_remainder(amount: u128, weights: &[u128]) -> Vec<u128> {
    let total = weights.iter().fold(U256::zero(), |t, &w| t + U256::from(w));
    if total.is_zero() {
        return vec![0; weights.len()];
    }
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for &w in weights {
        let exact = U256::from(amount) * U256::from(w);
        // exact / total ≤ amount: it fits a u128.
        parts.push((exact / total).low_u128());
        remainders.push(exact % total);
    }
    let given: u128 = parts.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0).collect();
    // Largest remainder first; the index breaks ties, so the split is the same everywhere.
    order.sort_by(|&a, &b| remainders[b].cmp(&remainders[a]).then(a.cmp(&b)));
    let left = usize::try_from(amount - given).unwrap_or(usize::MAX);
    for &i in order.iter().take(left) {
        parts[i] += 1;
    }
    parts
}

/// `amount` split pro rata to `balances` (in key order, whatever order they come in): each
/// holder with something to receive, in key order.
pub fn pro_rata<K: Ord + Clone>(amount: u128, balances: impl IntoIterator<Item = (K, u128)>) -> Vec<(K, u128)> {
    let mut sorted: Vec<(K, u128)> = balances.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let weights: Vec<u128> = sorted.iter().map(|b| b.1).collect();
    let parts = largest_remainder(amount, &weights);
    sorted.into_iter().zip(parts).filter(|(_, p)| *p > 0).map(|((k, _), p)| (k, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_exactly_with_ties_to_the_earlier() {
        assert_eq!(largest_remainder(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(largest_remainder(100, &[3, 1, 0]), vec![75, 25, 0]);
        assert_eq!(largest_remainder(7, &[0, 0]), vec![0, 0]);
        assert_eq!(
            largest_remainder(u128::MAX, &[u128::MAX, u128::MAX]).iter().map(|&p| p / 2).sum::<u128>(),
            u128::MAX / 2
        );
        assert_eq!(pro_rata(5, [("b", 1u128), ("a", 1), ("c", 0)]), vec![("a", 3), ("b", 2)]);
    }

    proptest! {
        #[test]
        fn nothing_is_lost_or_created(amount in any::<u128>(), weights in proptest::collection::vec(prop_oneof![Just(0u128), any::<u128>(), 0u128..1000], 0..12)) {
            let parts = largest_remainder(amount, &weights);
            prop_assert_eq!(parts.len(), weights.len());
            let total = weights.iter().fold(U256::zero(), |t, &w| t + U256::from(w));
            let sum = parts.iter().fold(U256::zero(), |t, &p| t + U256::from(p));
            prop_assert_eq!(sum, if total.is_zero() { U256::zero() } else { U256::from(amount) });
            for (&p, &w) in parts.iter().zip(&weights) {
                if total.is_zero() {
                    continue;
                }
                let exact = U256::from(amount) * U256::from(w) / total;
                prop_assert!(U256::from(p) == exact || U256::from(p) == exact + U256::one());
            }
        }
    }
}
